"""Backend for any OpenAI-compatible server (vLLM, llama-cpp-python's server, Ollama, hosted APIs).

Opening one probes what the server can do (`probe`), says it in one line, and picks a mode:

- completions: `/v1/completions` echoes the prompt with per-token log-probabilities (echo +
  logprobs, or vLLM's `prompt_logprobs`), so QL and RC are exact teacher-forced scores.
- chat: no usable prompt log-probabilities (hosted chat APIs; servers that echo only the
  generated tokens' log-probs): generation goes through `/v1/chat/completions`, RC is read from
  the `top_logprobs` of the one generated label token (a label absent from them is left out and
  the list's lowest value kept as its bound, `LabelScores.floor`), and QL is unavailable:
  `score` raises, and relabel fuses RC with the retriever instead.

Scoring sends prefix + continuation as one string, so the server tokenizes across the
boundary; the continuation is every token that overlaps text past the prefix. Where a token
straddles the boundary (prefix "Answer: " + "yes" gives one token " yes") it counts as the
continuation's, so boundary tokens, and their log-probabilities, may differ slightly from
in-process backends that tokenize the two parts separately.

With `batch=True` the calls of one `generate` / `score_and_label` / `label_logprobs_many` go
to OpenAI's Batch API as one job (half the price): the JSONL is uploaded, the job created with
its content hash in `metadata`, and its id kept in `$GECKO_HOME/openai-batches/HASH.json` before
polling, so a rerun after a crash finds the same job instead of paying for a second one.
Requests the job failed are sent live.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import httpcore
import httpx

from gecko.llm.base import (
    ContinuationScore,
    GenerationParams,
    JointRequest,
    JointScore,
    LabelScores,
    LLMError,
)

API_KEY_VARS = ("GECKO_OPENAI_API_KEY", "OPENAI_API_KEY")
SCORE_MODES = ("echo", "prompt_logprobs")
MODES = ("auto", "completions", "chat")
CHAT_TOP_LOGPROBS = 20  # the most OpenAI's chat API returns
# two 2-3-token prompts ending in the same word: its log-probability must be there and differ
PROBE_PROMPTS = ("Red apple", "Blue apple")
BATCH_DONE = ("completed",)
BATCH_DEAD = ("failed", "expired", "cancelled", "cancelling")


class _Retryable(Exception):
    """A failure worth another attempt (timeout, dropped connection, 5xx, 429, unreadable body)."""


class Refused(LLMError):
    """HTTP 4xx other than 429: the request (or endpoint) is wrong for this server; not retried."""


class OpenAILLM:
    """`openai:BASE_URL#MODEL`; BASE_URL includes the `/v1` part, MODEL defaults to the server's first.

    mode: auto (probe the server), completions or chat (trust the caller, no probe).
    score_mode: "echo" (echo=True + logprobs, widely supported) or "prompt_logprobs"
    (vLLM's extra field, which returns prompt log-probabilities without echoing text).
    extra_body: fields merged into every request, for server-specific knobs
    (e.g. {"repeat_penalty": 1.0} on llama-cpp-python, whose default is 1.1).
    batch: send each call's requests to the Batch API as one job (see the module doc).
    timeout bounds each network read; deadline (default 2 x timeout) a whole attempt, headers and
    body, so a server that trickles either in a byte at a time fails like a timeout (the Batch
    API's result downloads, whose size has no bound, are exempt).
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        mode: str = "auto",
        score_mode: str = "echo",
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        deadline: float | None = None,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_concurrency: int = 1,
        api_key: str | None = None,
        extra_body: dict | None = None,
        batch: bool = False,
        batch_poll_s: float = 30.0,
        batch_max_requests: int = 50_000,
        batch_dir: str | Path | None = None,
        quiet: bool = False,
    ):
        if score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.base_url = base_url.rstrip("/")
        self.score_mode = score_mode
        self.max_retries = max_retries
        self.backoff = backoff
        self.deadline = 2 * timeout if deadline is None else deadline
        self.max_concurrency = max(1, max_concurrency)
        self.extra_body = dict(extra_body or {})
        self.batch = batch
        self.batch_poll_s = batch_poll_s
        self.batch_max_requests = batch_max_requests
        if batch_dir is None:
            from gecko.models import gecko_home

            batch_dir = gecko_home() / "openai-batches"
        self.batch_dir = Path(batch_dir)
        key = api_key or next((os.environ[v] for v in API_KEY_VARS if os.environ.get(v)), None)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._attempt = _AttemptDeadline()
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=connect_timeout),
                                    transport=self._attempt.transport())
        self._lock = threading.Lock()
        # what the server reported in `usage`, live and through the Batch API (priced at a discount)
        self.tokens_in = self.tokens_out = self.batch_tokens_in = self.batch_tokens_out = 0
        self.model = model or self._first_model()
        # chat: generate through chat; rc_chat: labels from chat top_logprobs; *_missing: why not available
        self.chat = self.rc_chat = mode == "chat"
        self.ql_missing: str | None = "chat mode was asked for (mode=chat)" if self.chat else None
        self.rc_missing: str | None = None
        if mode == "auto":
            self.capabilities = self.probe()
            self.chat, self.ql_missing, self.rc_chat, self.rc_missing = self.capabilities.plan()
            if not quiet:
                print(f"gecko: {self.base_url}#{self.model}: {self.capabilities.line()}", file=sys.stderr, flush=True)
        # the mode changes what generate and the labels return, so it is part of the cache key
        self.identity = f"openai:{self.base_url}#{self.model}" + ("@chat" if self.chat else "@chat-rc" if self.rc_chat else "")

    def close(self) -> None:
        self._client.close()

    # --- transport ----------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None, parse: Callable[[Any], Any], *,
                 files: dict | None = None, text: bool = False) -> Any:
        """One call with bounded retries and exponential backoff; `parse` failing counts as a bad body.

        4xx other than 429 means the request itself is wrong, so it fails at once. `text`: parse
        the body as text (file downloads), not JSON.
        """
        url = f"{self.base_url}{path}"
        attempts = self.max_retries + 1
        problem = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self._attempt.at = None if text else time.monotonic() + self.deadline
            try:
                sent = {"data": body, "files": files} if files is not None else {"json": body}
                response = self._client.request(method, url, **sent)
                content = response.content
                shown = content[:500].decode(response.encoding or "utf-8", errors="replace")
                if response.status_code >= 500 or response.status_code == 429:
                    raise _Retryable(f"HTTP {response.status_code}: {shown[:200]!r}")
                if response.status_code >= 400:
                    raise Refused(f"{method} {url} was refused (not retried): HTTP {response.status_code}: {shown!r}")
                try:
                    return parse(content.decode(response.encoding or "utf-8", errors="replace") if text else json.loads(content))
                except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:  # incl. invalid JSON
                    raise _Retryable(f"bad response body ({type(e).__name__}: {e}): {shown[:200]!r}") from e
            except httpx.TimeoutException as e:
                late = self._attempt.at is not None and time.monotonic() >= self._attempt.at
                problem = f"timed out ({f'no whole answer within the {self.deadline:g} s deadline per attempt' if late else type(e).__name__})"
            except httpx.TransportError as e:  # refused, reset, or closed without a response
                problem = f"connection failed ({type(e).__name__}: {e})"
            except _Retryable as e:
                problem = str(e)
        raise LLMError(f"{method} {url} failed after {attempts} attempts; last: {problem}")

    def _first_model(self) -> str:
        return self._request("GET", "/models", None, lambda data: str(data["data"][0]["id"]))

    def _full(self, body: dict) -> dict:
        return {"model": self.model, **self.extra_body, **body}

    def _count(self, data: dict, batch: bool) -> None:
        usage = data.get("usage") or {}
        prefix = "batch_" if batch else ""
        with self._lock:
            for name, field in (("tokens_in", "prompt_tokens"), ("tokens_out", "completion_tokens")):
                setattr(self, prefix + name, getattr(self, prefix + name) + int(usage.get(field) or 0))

    def _post(self, path: str, body: dict, parse: Callable[[dict], Any]) -> Any:
        def counted(data: dict) -> Any:
            value = parse(data)
            self._count(data, batch=False)
            return value

        return self._request("POST", path, self._full(body), counted)

    def _post_many(self, path: str, bodies: list[dict], parse: Callable[[dict], Any] | list[Callable[[dict], Any]]) -> list:
        """One request per body (servers such as llama-cpp-python reject list prompts), in parallel
        up to `max_concurrency`, or all of them as Batch API jobs. `parse`: one for all, or one per body."""
        parses = parse if isinstance(parse, list) else [parse] * len(bodies)
        if self.batch and bodies:
            return self._batched(path, bodies, parses)
        if self.max_concurrency == 1 or len(bodies) < 2:
            return [self._post(path, b, f) for b, f in zip(bodies, parses)]
        with ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(lambda item: self._post(path, *item), zip(bodies, parses)))

    # --- capabilities -------------------------------------------------------------------
    def probe(self) -> "Capabilities":
        """What this server gives, from a handful of tiny requests (never through the Batch API)."""
        caps = Capabilities()
        try:
            last = [self._probe_prompt_logprob(p) for p in PROBE_PROMPTS]
            if abs(last[0] - last[1]) < 1e-6:
                caps.prompt_logprobs = f"the log-probability of 'apple' is {last[0]} after both 'Red' and 'Blue': not computed from the prompt"
        except Refused as e:
            caps.completions = caps.prompt_logprobs = f"completions refused ({_short(e)})"
        except _NoPromptLogprobs as e:
            caps.prompt_logprobs = str(e)
        except LLMError as e:  # e.g. HTTP 500 for logprobs a server was not started for
            caps.prompt_logprobs = _short(e)
        try:
            top = self._request("POST", "/chat/completions", self._full(_chat_label_body("Is the sky blue?", (" Yes", " No"))),
                                lambda d: _top_logprobs(d) if d["choices"][0]["logprobs"] else None)
            if not top:
                caps.chat_logprobs = "chat answers carry no top_logprobs"
        except Refused as e:
            caps.chat = caps.chat_logprobs = f"chat refused ({_short(e)})"
        except LLMError as e:
            caps.chat_logprobs = _short(e)
        return caps

    def _probe_prompt_logprob(self, text: str) -> float:
        body, spans_of = self._score_request(text)
        data = self._request("POST", "/completions", self._full(body), lambda d: d)
        try:
            spans = spans_of(data)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise _NoPromptLogprobs(f"no prompt log-probabilities in the answer ({type(e).__name__}: {e})") from None
        if not spans or spans[0][0] > 0:
            raise _NoPromptLogprobs("the log-probabilities returned do not cover every prompt token (only the generated ones?)")
        values = [lp for start, _, _, lp in spans if start > 0 or lp is not None]
        if any(v is None for v in values[1:]) or values[-1] is None:
            raise _NoPromptLogprobs("some prompt tokens came without a log-probability")
        return float(values[-1])

    # --- protocol -----------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[str]:
        body = {"max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p, "seed": params.seed}
        if params.stop:
            body["stop"] = list(params.stop)
        if self.chat:
            bodies = [{**body, "messages": [{"role": "user", "content": p}]} for p in prompts]
            return self._post_many("/chat/completions", bodies, lambda d: str(d["choices"][0]["message"]["content"] or ""))
        return self._post_many("/completions", [{**body, "prompt": p} for p in prompts], lambda d: str(d["choices"][0]["text"]))

    def score(self, prefix: str, continuations: Sequence[str]) -> list[ContinuationScore]:
        self._need_ql()
        conts = list(continuations)
        todo = [i for i, c in enumerate(conts) if c]
        out = [ContinuationScore([], []) for _ in conts]
        for i, s in zip(todo, self._score_many([(prefix, conts[i]) for i in todo])):
            out[i] = s
        return out

    def label_logprobs(self, prompt: str, labels: Sequence[str]) -> LabelScores:
        """Exact, by teacher-forced scoring of each label (a top-k list would miss unlikely labels);
        in chat mode from the top log-probabilities of the one generated token."""
        (scores,) = self.label_logprobs_many([prompt], labels)
        return scores

    def label_logprobs_many(self, prompts: Sequence[str], labels: Sequence[str]) -> list[LabelScores]:
        labels = tuple(labels)
        if self.rc_missing:
            raise LLMError(f"{self.identity}: label log-probabilities (RC) unavailable: {self.rc_missing}")
        if self.rc_chat:
            bodies = [_chat_label_body(p, labels) for p in prompts]
            return self._post_many("/chat/completions", bodies, lambda d: _labels_from_top(_top_logprobs(d), labels))
        flat = self._score_many([(p, label) for p in prompts for label in labels])
        return [LabelScores({label: flat[i * len(labels) + j].total for j, label in enumerate(labels)}) for i in range(len(prompts))]

    def score_and_label(self, prefix: str, requests: Sequence[JointRequest]) -> list[JointScore]:
        """Every request's QL and label scores as one set of calls (one Batch job in batch mode)."""
        self._need_ql()
        pairs = []
        for r in requests:
            pairs.append((prefix + r.context, r.continuation))
            pairs += [(prefix + r.context + r.continuation + r.question, label) for label in r.labels]
        flat = iter(self._score_many(pairs))
        out = []
        for r in requests:
            cont = next(flat)
            out.append(JointScore(cont, LabelScores({label: next(flat).total for label in r.labels})))
        return out

    # --- scoring ------------------------------------------------------------------------
    def _need_ql(self) -> None:
        if self.ql_missing:
            raise LLMError(f"{self.identity}: query likelihood (QL) unavailable: {self.ql_missing}")

    def _score_request(self, text: str) -> tuple[dict, Callable[[dict], list[Span]]]:
        """A /completions body that returns the prompt's log-probabilities, and the parser of its spans."""
        body = {"prompt": text, "max_tokens": 1, "temperature": 0.0}  # 0 means "unlimited" on some servers
        if self.score_mode == "echo":
            return {**body, "echo": True, "logprobs": 1}, lambda d: echo_spans(d, text)
        return {**body, "prompt_logprobs": 0}, lambda d: prompt_logprob_spans(d, text)

    def _score_many(self, pairs: list[tuple[str, str]]) -> list[ContinuationScore]:
        requests = [self._score_request(prefix + continuation) for prefix, continuation in pairs]
        answers = self._post_many("/completions", [body for body, _ in requests], [parse for _, parse in requests])
        out = []
        for (prefix, _), spans in zip(pairs, answers):
            kept = [(tok, lp) for start, end, tok, lp in spans if end > len(prefix)]
            if any(lp is None for _, lp in kept):
                raise LLMError(f"{self.base_url}: server gave no log-probability for the first prompt token; score needs a non-empty prefix")
            out.append(ContinuationScore([t for t, _ in kept], [float(lp) for _, lp in kept]))
        return out

    # --- Batch API ----------------------------------------------------------------------
    def _batched(self, path: str, bodies: list[dict], parses: list[Callable[[dict], Any]]) -> list:
        full = [self._full(b) for b in bodies]
        parts = [full[lo : lo + self.batch_max_requests] for lo in range(0, len(full), self.batch_max_requests)]
        jobs = [self._submit(path, part) for part in parts]  # all submitted before waiting on any
        out: list = []
        for n, (part, job) in enumerate(zip(parts, jobs)):
            answers = self._results(job)
            for i, body in enumerate(part):
                parse = parses[n * self.batch_max_requests + i]
                data = answers.get(f"r{i}")
                try:
                    if data is not None:
                        value = parse(data)
                        self._count(data, batch=True)
                        out.append(value)
                        continue
                except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                    pass
                out.append(self._post(path, body, parse))  # failed in the job: sent live
        return out

    def _submit(self, path: str, bodies: list[dict]) -> str:
        """The job for these requests: the one already submitted (state file, or found by its
        metadata after a crash before the state file was written), else a new one."""
        lines = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": f"/v1{path}", "body": b}, sort_keys=True) + "\n"
                        for i, b in enumerate(bodies))
        key = hashlib.sha256(f"{self.base_url}\n{lines}".encode()).hexdigest()[:32]
        state = self.batch_dir / f"{key}.json"
        if state.is_file():
            return json.loads(state.read_text())["id"]
        listed = self._request("GET", "/batches?limit=100", None, lambda d: d["data"])
        job = next((b["id"] for b in listed if (b.get("metadata") or {}).get("gecko_key") == key and b["status"] not in BATCH_DEAD), None)
        if job is None:
            file_id = self._request("POST", "/files", {"purpose": "batch"}, lambda d: d["id"],
                                    files={"file": (f"gecko-{key}.jsonl", lines.encode(), "application/jsonl")})
            job = self._request("POST", "/batches", {"input_file_id": file_id, "endpoint": f"/v1{path}", "completion_window": "24h",
                                                      "metadata": {"gecko_key": key}}, lambda d: d["id"])
        from gecko.journal import write_json_atomic

        self.batch_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(state, {"id": job, "endpoint": f"/v1{path}", "requests": len(bodies), "base_url": self.base_url})
        print(f"gecko: batch {job}: {len(bodies)} requests to {path} submitted", file=sys.stderr, flush=True)
        return job

    def _results(self, job: str) -> dict[str, dict]:
        """Poll until the job ends; its successful answers by custom_id (a dead job is an error)."""
        shown = None
        while True:
            info = self._request("GET", f"/batches/{job}", None, lambda d: d)
            status = info["status"]
            if status in BATCH_DONE:
                break
            if status in BATCH_DEAD:
                for state in self.batch_dir.glob("*.json"):  # forget it: a rerun submits a new job
                    if json.loads(state.read_text()).get("id") == job:
                        state.unlink()
                raise LLMError(f"batch {job} {status}: {str(info.get('errors'))[:300]}; rerun to submit it again")
            counts = info.get("request_counts") or {}
            if (status, counts) != shown:
                print(f"gecko: batch {job}: {status} {counts}", file=sys.stderr, flush=True)
                shown = (status, counts)
            time.sleep(self.batch_poll_s)
        out: dict[str, dict] = {}
        if info.get("output_file_id"):
            text = self._request("GET", f"/files/{info['output_file_id']}/content", None, lambda t: t, text=True)
            for line in text.splitlines():
                if line.strip():
                    item = json.loads(line)
                    response = item.get("response") or {}
                    if response.get("status_code") == 200 and isinstance(response.get("body"), dict):
                        out[item["custom_id"]] = response["body"]
        return out


class _NoPromptLogprobs(Exception):
    pass


class _AttemptDeadline:
    """The calling thread's attempt deadline, applied to every socket read of its requests.

    httpx bounds each read by the timeout but not a whole request, so a server that sends its
    headers or body a byte at a time could hold an attempt forever; reads here stop at the
    deadline set for the attempt (`at`, per thread: the client's calls run concurrently)."""

    def __init__(self):
        self._local = threading.local()

    @property
    def at(self) -> float | None:
        return getattr(self._local, "at", None)

    @at.setter
    def at(self, value: float | None) -> None:
        self._local.at = value

    def transport(self) -> httpx.HTTPTransport:
        transport = httpx.HTTPTransport()
        pool = transport._pool  # httpx has no public hook for the socket layer; httpcore's pool takes a backend
        pool._network_backend = _DeadlineBackend(pool._network_backend, self)
        return transport

    def read_timeout(self, timeout: float | None) -> float | None:
        if self.at is None:
            return timeout
        left = self.at - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout("past the attempt's deadline")
        return left if timeout is None else min(timeout, left)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, backend: httpcore.NetworkBackend, deadline: _AttemptDeadline):
        self._backend, self._deadline = backend, deadline

    def connect_tcp(self, *args, **kwargs) -> httpcore.NetworkStream:
        return _DeadlineStream(self._backend.connect_tcp(*args, **kwargs), self._deadline)

    def connect_unix_socket(self, *args, **kwargs) -> httpcore.NetworkStream:
        return _DeadlineStream(self._backend.connect_unix_socket(*args, **kwargs), self._deadline)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream, deadline: _AttemptDeadline):
        self._stream, self._deadline = stream, deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._deadline.read_timeout(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, *args, **kwargs) -> httpcore.NetworkStream:
        return _DeadlineStream(self._stream.start_tls(*args, **kwargs), self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class Capabilities:
    """What the probe found: None where a capability is there, else why it is not."""

    def __init__(self):
        self.completions: str | None = None
        self.prompt_logprobs: str | None = None
        self.chat: str | None = None
        self.chat_logprobs: str | None = None

    def plan(self) -> tuple[bool, str | None, bool, str | None]:
        """(generate through chat, why QL is missing, RC from chat top_logprobs, why RC is missing).

        Completions stay the way to generate wherever they work (a base model wants its few-shot
        prompt as it is); chat is used for what completions cannot give. Nothing working is an error."""
        if self.prompt_logprobs is None:
            return False, None, False, None
        ql = self.prompt_logprobs
        if self.completions is None or self.chat is None:
            via_chat = self.completions is not None
            if self.chat_logprobs is None:
                return via_chat, ql, True, None
            return via_chat, ql, False, f"{ql}; {self.chat_logprobs}"
        raise LLMError(f"the server answers neither completions ({self.completions}) nor chat ({self.chat})")

    def line(self) -> str:
        chat, ql, rc_chat, rc = self.plan()
        if not ql:
            return "prompt log-probabilities: yes: QL and RC exact (teacher-forced), generate via completions"
        return (f"prompt log-probabilities: no ({ql}): QL unavailable (relabel fuses RC + retriever); "
                + (f"RC unavailable ({rc}); " if rc else f"RC from the label token's top-{CHAT_TOP_LOGPROBS} chat log-probabilities; ")
                + f"generate via {'chat' if chat else 'completions'}")


def _short(error: Exception) -> str:
    return str(error).split(" was refused (not retried): ")[-1].split("; last: ")[-1][:160]


def _chat_label_body(prompt: str, labels: Sequence[str]) -> dict:
    """One generated token with its top log-probabilities; the system line names the labels."""
    words = " or ".join(label.strip() for label in labels)
    return {"messages": [{"role": "system", "content": f"Answer with one word: {words}."}, {"role": "user", "content": prompt}],
            "max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": CHAT_TOP_LOGPROBS}


def _top_logprobs(data: dict) -> list[dict]:
    return list(data["choices"][0]["logprobs"]["content"][0]["top_logprobs"])


def _labels_from_top(top: list[dict], labels: Sequence[str]) -> LabelScores:
    """Each label's log-probability from a top-k list: its surface forms (" Yes", "Yes", "yes")
    summed in probability; a label with none listed is left out, below `floor`."""
    if not top:
        raise ValueError("empty top_logprobs")
    found: dict[str, float] = {}
    for label in labels:
        values = [float(e["logprob"]) for e in top if str(e["token"]).strip().lower() == label.strip().lower()]
        if values:
            peak = max(values)
            found[label] = peak + math.log(sum(math.exp(v - peak) for v in values))
    return LabelScores(found, floor=min(float(e["logprob"]) for e in top))


Span = tuple[int, int, str, "float | None"]


def echo_spans(data: dict, text: str) -> list[Span]:
    """(start, end, token, logprob) of each echoed prompt token; generated tokens are dropped.

    Servers disagree on where text_offset starts (vLLM counts the BOS text, llama-cpp-python
    skips BOS), but not on token widths, so spans are laid out from the end of the text.
    """
    logprobs = data["choices"][0]["logprobs"]
    tokens, values, offsets = logprobs["tokens"], logprobs["token_logprobs"], logprobs["text_offset"]
    if not (len(tokens) == len(values) == len(offsets)):
        raise ValueError("logprobs.tokens, token_logprobs and text_offset differ in length")
    generated = (data.get("usage") or {}).get("completion_tokens")
    if generated is None:
        generated = sum(1 for start in offsets if start >= len(text))
    n = len(tokens) - generated
    if n <= 0:
        raise ValueError(f"no prompt tokens echoed ({len(tokens)} tokens, {generated} generated)")
    widths = [b - a for a, b in zip(offsets[: n - 1], offsets[1:n])]
    widths.append(offsets[n] - offsets[n - 1] if n < len(offsets) else len(tokens[n - 1]))
    return _right_aligned(text, tokens[:n], widths, values[:n])


def prompt_logprob_spans(data: dict, text: str) -> list[Span]:
    """Spans from vLLM's `prompt_logprobs`: [None, {token_id: {logprob, rank, decoded_token}}, ...].

    The first position (often BOS) comes as None with no text, so spans are laid out from the end.
    """
    tokens, values = [], []
    for entry in data["choices"][0]["prompt_logprobs"][1:]:
        if len(entry) != 1:  # with prompt_logprobs=0 only the prompt token itself is listed
            raise ValueError(f"expected one candidate per prompt position, got {len(entry)}")
        (info,) = entry.values()
        tokens.append(str(info["decoded_token"]))
        values.append(float(info["logprob"]))
    return _right_aligned(text, tokens, [len(t) for t in tokens], values)


def _right_aligned(text: str, tokens: list[str], widths: list[int], values: list) -> list[Span]:
    spans: list[Span] = []
    end = len(text)
    for token, width, value in zip(reversed(tokens), reversed(widths), reversed(values)):
        spans.append((end - width, end, token, value))
        end -= width
    return spans[::-1]
