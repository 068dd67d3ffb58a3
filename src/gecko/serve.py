"""`gecko serve`: OpenAI-compatible embeddings over HTTP, plus search over a corpus.

Routes: `POST /v1/embeddings` (OpenAI's request and response: `input` string or list, `model`,
`dimensions` = Matryoshka truncation then re-normalisation, `encoding_format` float or base64),
`POST /v1/search` (`query` string or list, `top_k`, optional `task` → ids and cosine scores from a
FAISS inner-product index over `--corpus`, built at start), `GET /v1/models` and `GET /healthz`.

One model serves every request. A single worker encodes; requests that arrive while it is busy
wait in a queue and are encoded together in its next batch (`MicroBatcher`), so concurrent
clients share forward passes instead of queueing one by one.

Safety: loopback by default; with an API key (`--api-key` or `GECKO_API_KEY`) every route but
/healthz wants `Authorization: Bearer KEY`. Inputs per request, characters per input and body
bytes are capped. Every error is OpenAI's JSON shape `{"error": {"message", "type", "param",
"code"}}`: 400 malformed JSON or bad fields, 401 missing or wrong key, 404 unknown route or no
corpus, 413 too many inputs or too large a body, 422 an input over the character limit, 500 an
internal error (logged here, never sent as a traceback).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

from gecko.embed import truncate
from gecko.models import DEFAULT
from gecko.options import option

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServeConfig:
    model: str = option(DEFAULT, "sentence-transformers folder or default (packaged MiniLM)")
    host: str = option(LOOPBACK, "address to bind (default: loopback only)")
    port: int = 8000
    corpus: str | None = option(None, "corpus indexed at start for POST /v1/search")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' (prefer env GECKO_API_KEY: flags show in ps)")
    # OpenAI allows 2048 inputs; each costs a forward pass here
    max_inputs: int = option(256, "inputs per request (413 above)")
    # the model reads its first max_seq_length tokens anyway
    max_chars: int = option(16_384, "characters per input (422 above)")
    max_top_k: int = option(1_000, "results per search query (400 above)")
    batch_texts: int = option(1_024, "at most this many texts (from whole requests) per micro-batch")
    device: str | None = option(None, "torch device (default: cuda when available, else cpu)")
    cache_dir: str | None = option(None, "corpus embedding cache (default: $GECKO_HOME/embeddings)")

    @property
    def max_body_bytes(self) -> int:
        # JSON may spend 12 bytes on one character (an escaped surrogate pair), plus room for the other fields
        return self.max_inputs * (12 * self.max_chars + 8) + 65_536


class APIError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class MicroBatcher:
    """Encodes queued requests together: whatever waits when the worker is free becomes one batch.

    `embed(texts, prompt)` runs in a worker thread, one call at a time; requests with different
    prompts (embeddings vs search queries) in one batch are encoded in one call per prompt.
    """

    def __init__(self, embed: Callable[[list[str], str | None], tuple[np.ndarray, np.ndarray]], max_texts: int = 1_024):
        self._embed = embed
        self.max_texts = max_texts
        self.stats = {"batches": 0, "requests": 0, "texts": 0, "largest_batch_requests": 0}
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, texts: list[str], prompt: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(normalised embeddings, token counts) of `texts`, encoded in the next batch."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((texts, prompt, future))
        return await future

    async def _run(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            size = len(jobs[0][0])
            while size < self.max_texts and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
                size += len(jobs[-1][0])
            jobs = [job for job in jobs if not job[2].done()]  # their clients went away
            if not jobs:
                continue
            size = sum(len(job[0]) for job in jobs)
            self.stats["batches"] += 1
            self.stats["requests"] += len(jobs)
            self.stats["texts"] += size
            self.stats["largest_batch_requests"] = max(self.stats["largest_batch_requests"], len(jobs))
            groups: dict[str | None, list] = {}
            for job in jobs:
                groups.setdefault(job[1], []).append(job)
            for prompt, group in groups.items():
                await self._encode(prompt, group)

    async def _encode(self, prompt: str | None, group: list) -> None:
        texts = [text for job in group for text in job[0]]
        try:
            emb, tokens = await asyncio.to_thread(self._embed, texts, prompt)
        except Exception as err:  # reaches each waiting request as a 500
            for _, _, future in group:
                if not future.done():
                    future.set_exception(err)
            return
        start = 0
        for job_texts, _, future in group:
            end = start + len(job_texts)
            if not future.done():
                future.set_result((emb[start:end], tokens[start:end]))
            start = end


def create_app(config: ServeConfig, encoder=None):
    """The Starlette app: loads the model (and indexes `config.corpus`) now, so /healthz answers only when ready."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    from gecko.embed import EmbedError, Embedder

    for name in ("max_inputs", "max_chars", "max_top_k", "batch_texts"):
        if getattr(config, name) < 1:
            raise EmbedError(f"{name} must be positive, got {getattr(config, name)}")
    # one model for requests (embedded uncached, by encode_counted) and the corpus (through the disk cache)
    encoder = encoder or Embedder(config.model, device=config.device, cache_dir=config.cache_dir, progress=False)
    service = _Service(config, encoder, _CorpusIndex(config, encoder) if config.corpus else None)
    routes = [
        Route("/v1/embeddings", service.embeddings, methods=["POST"]),
        Route("/v1/search", service.search, methods=["POST"]),
        Route("/v1/models", service.models, methods=["GET"]),
        Route("/healthz", service.healthz, methods=["GET"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=service.lifespan)
    app.state.batcher = service.batcher
    return app


def _json(body: dict, status: int = 200, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(request, err: APIError):
    return _json(err.body(), err.status, {"WWW-Authenticate": "Bearer"} if err.status == 401 else None)


async def _http_error(request, err):
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    return await _api_error(request, APIError(err.status_code, str(err.detail), code=code))


async def _internal_error(request, err: Exception):
    # Starlette re-raises after answering, so the server logs the traceback; the client gets none
    return await _api_error(request, APIError(500, "internal server error", type="server_error"))


def _optional(data: dict, name: str, kind: type, default=None):
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or isinstance(value, bool):
        raise APIError(400, f"'{name}' must be {'an integer' if kind is int else 'a string'}", param=name)
    return value


class _Service:
    """The routes: one model behind one micro-batcher, the corpus index, and `config`'s key and limits."""

    def __init__(self, config: ServeConfig, encoder, index: "_CorpusIndex | None"):
        self.config, self.encoder, self.index = config, encoder, index
        self.batcher = MicroBatcher(encoder.encode_counted, config.batch_texts)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.batcher.start()
        yield
        await self.batcher.stop()

    def authorize(self, request) -> None:
        key = self.config.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer YOUR_KEY'.",
                           code="invalid_api_key")

    async def read_json(self, request) -> dict:
        """The body as a JSON object, read no further than the size limit."""
        from starlette.requests import ClientDisconnect

        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = APIError(413, f"request body over {limit} bytes", code="request_too_large")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large
        except ClientDisconnect:  # hung up mid-body: nobody to answer, nothing to log
            raise APIError(400, "the client closed the connection before the body ended") from None
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise APIError(400, "could not parse the request body as JSON") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        return data

    def texts_of(self, data: dict, name: str) -> list[str]:
        value, config = data.get(name), self.config
        if value is None:
            raise APIError(400, f"'{name}' is required", param=name)
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise APIError(400, f"'{name}' must be a string or a list of strings (token arrays are not supported)", param=name)
        if not texts:
            raise APIError(400, f"'{name}' must not be empty", param=name)
        if len(texts) > config.max_inputs:
            raise APIError(413, f"'{name}' has {len(texts)} items; at most {config.max_inputs} per request",
                           param=name, code="too_many_inputs")
        for i, text in enumerate(texts):
            if not text.strip():
                raise APIError(400, f"'{name}'[{i}] is empty", param=name)
            if len(text) > config.max_chars:
                raise APIError(422, f"'{name}'[{i}] has {len(text)} characters; at most {config.max_chars}",
                               param=name, code="input_too_long")
        return texts

    def _answer(self, data: list, tokens: np.ndarray):
        used = int(tokens.sum())
        return _json({"object": "list", "data": data, "model": self.encoder.name,
                      "usage": {"prompt_tokens": used, "total_tokens": used}})

    async def embeddings(self, request):
        self.authorize(request)
        data = await self.read_json(request)
        texts = self.texts_of(data, "input")
        _optional(data, "model", str)
        dims = _optional(data, "dimensions", int)
        if dims is not None and not 1 <= dims <= self.encoder.dim:
            raise APIError(400, f"'dimensions' must be between 1 and {self.encoder.dim}", param="dimensions")
        fmt = _optional(data, "encoding_format", str, "float")
        if fmt not in ("float", "base64"):
            raise APIError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        emb, tokens = await self.batcher.submit(texts)
        if dims is not None:
            emb = truncate(emb, dims)
        rows = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in emb] if fmt == "base64" else emb.tolist()
        return self._answer([{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)], tokens)

    async def search(self, request):
        from gecko.embed import EmbedError
        from gecko.encode import input_format

        self.authorize(request)
        if self.index is None:
            raise APIError(404, "no corpus to search: start the server with --corpus PATH", code="no_corpus")
        data = await self.read_json(request)
        queries = self.texts_of(data, "query")
        _optional(data, "model", str)
        top_k = _optional(data, "top_k", int, 10)
        if not 1 <= top_k <= self.config.max_top_k:
            raise APIError(400, f"'top_k' must be between 1 and {self.config.max_top_k}", param="top_k")
        try:
            prompt = input_format(self.encoder, "query", _optional(data, "task", str)).prompt
        except EmbedError as err:
            raise APIError(400, str(err), param="task") from None
        emb, tokens = await self.batcher.submit(queries, prompt)
        scores, rows = await asyncio.to_thread(self.index.search, emb, top_k)
        ids = self.index.ids
        return self._answer([
            {"object": "search_result", "index": i,
             "results": [{"id": ids[r], "score": float(s)} for r, s in zip(row_ids, row_scores) if r >= 0]}
            for i, (row_ids, row_scores) in enumerate(zip(rows, scores))
        ], tokens)

    async def models(self, request):
        self.authorize(request)
        return _json({"object": "list", "data": [{"id": self.encoder.name, "object": "model", "created": 0, "owned_by": "gecko"}]})

    async def healthz(self, request):
        return _json({"status": "ok", "model": self.encoder.name, "dim": self.encoder.dim,
                      "corpus": len(self.index.ids) if self.index else None, "batching": self.batcher.stats})


class _CorpusIndex:
    """`gecko.retrieve.Retriever` over the corpus, its passages embedded as documents with the served model."""

    def __init__(self, config: ServeConfig, encoder):
        from gecko.corpus import Passage, load_corpus
        from gecko.embed import EmbedError
        from gecko.encode import input_format
        from gecko.retrieve import RetrieveConfig, Retriever

        passages, summary = load_corpus(config.corpus)
        if not passages:
            skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(summary.skipped.items())) or "none"
            raise EmbedError(f"{config.corpus}: no passages to search (skipped: {skipped})")
        fmt = input_format(encoder, "document")
        # the retriever embeds `{text}` as is, so each passage carries its full model input
        inputs = [Passage(p.id, p.doc_id, "", (fmt.prompt or "") + fmt.text(p)) for p in passages]
        self.retriever = Retriever(inputs, RetrieveConfig(document_format="{text}"), progress=False, embedder=encoder)
        self.retriever.build()
        self.ids = [p.id for p in passages]

    def search(self, emb: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.retriever.search(emb, top_k)


def run_server(config: ServeConfig) -> None:
    """Serve until interrupted."""
    import uvicorn

    # oneDNN compiles and keeps a kernel per input shape (up to 1,024 of them): under clients' texts of
    # every length the RSS grew for minutes; a small cache holds it flat (benchmarks/RESULTS.md, "The
    # server under abuse"). Set before the model loads; an explicit setting wins.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
    app = create_app(config)
    if config.api_key is None and not _is_loopback(config.host):
        print(f"gecko serve: warning: listening on {config.host} without an API key; anyone who can reach it can use it",
              file=sys.stderr)
    print(f"gecko serve: {config.model} on http://{config.host}:{config.port}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=config.host, port=config.port, access_log=False, log_level="warning")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
