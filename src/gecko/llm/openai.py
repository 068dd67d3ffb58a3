"""Backend for any OpenAI-compatible completions server (vLLM, llama-cpp-python's server, Ollama).

Only the legacy `/v1/completions` endpoint is used: it is the one that can echo the prompt
with per-token log-probabilities, which teacher-forced scoring needs. `generate` works on any
such server; `score` needs echo + logprobs (vLLM, llama-cpp-python with logits_all) or vLLM's
`prompt_logprobs`.

Scoring sends prefix + continuation as one string, so the server tokenizes across the
boundary; the continuation is every token that overlaps text past the prefix. Where a token
straddles the boundary (prefix "Answer: " + "yes" gives one token " yes") it counts as the
continuation's, so boundary tokens, and their log-probabilities, may differ slightly from
in-process backends that tokenize the two parts separately.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import httpx

from gecko.llm.base import ContinuationScore, GenerationParams, LabelScores, LLMError, label_logprobs_by_scoring

API_KEY_VARS = ("GECKO_OPENAI_API_KEY", "OPENAI_API_KEY")
SCORE_MODES = ("echo", "prompt_logprobs")


class _Retryable(Exception):
    """A failure worth another attempt (timeout, dropped connection, 5xx, 429, unreadable body)."""


class OpenAILLM:
    """`openai:BASE_URL#MODEL`; BASE_URL includes the `/v1` part, MODEL defaults to the server's first.

    score_mode: "echo" (echo=True + logprobs, widely supported) or "prompt_logprobs"
    (vLLM's extra field, which returns prompt log-probabilities without echoing text).
    extra_body: fields merged into every completions request, for server-specific knobs
    (e.g. {"repeat_penalty": 1.0} on llama-cpp-python, whose default is 1.1).
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        score_mode: str = "echo",
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_concurrency: int = 1,
        api_key: str | None = None,
        extra_body: dict | None = None,
    ):
        if score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
        self.base_url = base_url.rstrip("/")
        self.score_mode = score_mode
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_concurrency = max(1, max_concurrency)
        self.extra_body = dict(extra_body or {})
        key = api_key or next((os.environ[v] for v in API_KEY_VARS if os.environ.get(v)), None)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=connect_timeout))
        self.model = model or self._first_model()
        self.identity = f"openai:{self.base_url}#{self.model}"

    def close(self) -> None:
        self._client.close()

    # --- transport ----------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None, parse: Callable[[Any], Any]) -> Any:
        """One call with bounded retries and exponential backoff; `parse` failing counts as a bad body.

        4xx other than 429 means the request itself is wrong, so it fails at once.
        """
        url = f"{self.base_url}{path}"
        attempts = self.max_retries + 1
        problem = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self._client.request(method, url, json=body)
                if response.status_code >= 500 or response.status_code == 429:
                    raise _Retryable(f"HTTP {response.status_code}: {response.text[:200]!r}")
                if response.status_code >= 400:
                    raise LLMError(f"{method} {url} was refused (not retried): HTTP {response.status_code}: {response.text[:500]!r}")
                try:
                    return parse(response.json())
                except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:  # incl. invalid JSON
                    raise _Retryable(f"bad response body ({type(e).__name__}: {e}): {response.text[:200]!r}") from e
            except httpx.TimeoutException as e:
                problem = f"timed out ({type(e).__name__})"
            except httpx.TransportError as e:  # refused, reset, or closed without a response
                problem = f"connection failed ({type(e).__name__}: {e})"
            except _Retryable as e:
                problem = str(e)
        raise LLMError(f"{method} {url} failed after {attempts} attempts; last: {problem}")

    def _first_model(self) -> str:
        return self._request("GET", "/models", None, lambda data: str(data["data"][0]["id"]))

    def _complete(self, body: dict, parse: Callable[[dict], Any]) -> Any:
        return self._request("POST", "/completions", {"model": self.model, **self.extra_body, **body}, parse)

    def _map(self, fn: Callable, items: Sequence) -> list:
        """One request per item (servers such as llama-cpp-python reject list prompts), optionally in parallel."""
        if self.max_concurrency == 1 or len(items) < 2:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(fn, items))

    # --- protocol -----------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[str]:
        body = {
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": params.seed,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        return self._map(lambda p: self._complete({**body, "prompt": p}, lambda d: str(d["choices"][0]["text"])), list(prompts))

    def score(self, prefix: str, continuations: Sequence[str]) -> list[ContinuationScore]:
        return self._map(lambda c: self._score_one(prefix, c), list(continuations))

    def label_logprobs(self, prompt: str, labels: Sequence[str]) -> LabelScores:
        """Exact, by teacher-forced scoring of each label: a top-k list would miss unlikely labels."""
        return label_logprobs_by_scoring(self, prompt, labels)

    # --- scoring ------------------------------------------------------------------------
    def _score_one(self, prefix: str, continuation: str) -> ContinuationScore:
        if not continuation:
            return ContinuationScore([], [])
        text = prefix + continuation
        body = {"prompt": text, "max_tokens": 1, "temperature": 0.0}  # 0 means "unlimited" on some servers
        if self.score_mode == "echo":
            body.update(echo=True, logprobs=1)
            spans = self._complete(body, lambda d: echo_spans(d, text))
        else:
            body.update(prompt_logprobs=0)
            spans = self._complete(body, lambda d: prompt_logprob_spans(d, text))
        kept = [(tok, lp) for start, end, tok, lp in spans if end > len(prefix)]
        if any(lp is None for _, lp in kept):
            raise LLMError(f"{self.base_url}: server gave no log-probability for the first prompt token; score needs a non-empty prefix")
        return ContinuationScore([t for t, _ in kept], [float(lp) for _, lp in kept])


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
