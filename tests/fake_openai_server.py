"""A scripted stand-in for an OpenAI-compatible server, for fault-injection tests (real HTTP).

Each request takes the next fault from `script` ("500", "429", "400", "404", "hang", "drop",
"badjson", "drip": the normal answer one byte every `drip_s`, "headdrip": its headers so); once the script is empty it
answers normally. Every request is recorded, so
tests can count the attempts the client made and inspect what it sent.

Routes: `/v1/completions` answers with `responder(body)`, `/v1/chat/completions` with
`chat_responder(body)`; a path in `refuse` gets a 404 (a chat-only API has no completions).
`upstream` (a real server's base URL) makes both forward there instead, so a real model answers
through the fake's faults and refusals. The Files and Batches endpoints work as OpenAI's do, on a
small scale: an uploaded JSONL job runs through the same routes when it is polled
`batch_polls` times; `batch_fail` (custom ids) fail in the job, `batch_end` sets its final status.
"""

from __future__ import annotations

import email.parser
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import httpx


def default_completion(body: dict) -> dict:
    return {"choices": [{"index": 0, "text": "ok", "logprobs": None, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def echo_any(body: dict) -> dict:
    """An echo server that computes: each word's log-probability depends on everything before it."""
    words = body["prompt"].replace(" ", "\0 ").split("\0")
    offsets = [sum(map(len, words[:i])) for i in range(len(words))]
    values = [None] + [-(1 + sum(map(ord, body["prompt"][:offsets[i]])) % 97 / 10) for i in range(1, len(words))]
    return {"choices": [{"text": body["prompt"] + "!", "logprobs": {
        "tokens": words + ["!"], "token_logprobs": values + [-0.5], "text_offset": offsets + [len(body["prompt"])], "top_logprobs": None}}],
        "usage": {"prompt_tokens": len(words), "completion_tokens": 1}}


def default_chat(body: dict) -> dict:
    """A reply "Yes" whose top log-probabilities hold "Yes", " yes" and "No", as hosted chat APIs give them."""
    logprobs = None
    if body.get("logprobs"):
        top = [{"token": "Yes", "logprob": -0.3}, {"token": "No", "logprob": -1.5}, {"token": " yes", "logprob": -3.0},
               {"token": "Maybe", "logprob": -6.0}][: body.get("top_logprobs") or 1]
        logprobs = {"content": [{"token": "Yes", "logprob": -0.3, "top_logprobs": top}]}
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Yes"}, "logprobs": logprobs,
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21}}


class FakeOpenAIServer:
    def __init__(self, model: str = "fake-model", hang_s: float = 1.0, upstream: str | None = None, drip_s: float = 0.05):
        self.model = model
        self.hang_s = hang_s
        self.drip_s = drip_s
        self.upstream = upstream
        self.script: list[str] = []
        self.requests: list[dict] = []  # {"method", "path", "headers", "body"}
        self.responder: Callable[[dict], dict] = default_completion
        self.chat_responder: Callable[[dict], dict] = default_chat
        self.refuse: set[str] = set()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batch_polls = 2
        self.batch_fail: set[str] = set()
        self.batch_end = "completed"
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # a hanging handler must not stall teardown
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)  # fast shutdown

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> "FakeOpenAIServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next_fault(self, record: dict) -> str | None:
        with self._lock:
            self.requests.append(record)
            return self.script.pop(0) if self.script else None

    def forward(self, path: str, body: dict) -> dict:
        """The upstream server's answer to the same request."""
        response = httpx.post(self.upstream.removesuffix("/v1") + path, json=body, timeout=600)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        if path in self.refuse:
            return 404, {"error": {"message": f"unknown route {path}", "type": "invalid_request_error"}}
        if path == "/v1/completions":
            return 200, (self.forward(path, body) if self.upstream and self.responder is default_completion else self.responder(body))
        if path == "/v1/chat/completions":
            return 200, (self.forward(path, body) if self.upstream and self.chat_responder is default_chat else self.chat_responder(body))
        return 404, {"error": {"message": f"unknown route {path}"}}

    def _answer(self, method: str, path: str, body: dict, raw: bytes, content_type: str) -> tuple[int, object]:
        if method == "GET" and path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]}
        if method == "POST" and path == "/v1/files":
            content = _multipart_file(raw, content_type)
            with self._lock:
                file_id = f"file-{len(self.files) + 1}"
                self.files[file_id] = content
            return 200, {"id": file_id, "object": "file", "purpose": "batch", "bytes": len(content)}
        if method == "GET" and path.startswith("/v1/files/") and path.endswith("/content"):
            return 200, self.files[path.split("/")[3]]
        if method == "POST" and path == "/v1/batches":
            with self._lock:
                batch_id = f"batch-{len(self.batches) + 1}"
                self.batches[batch_id] = {"id": batch_id, "object": "batch", "status": "validating", "polls": 0,
                                          "input_file_id": body["input_file_id"], "endpoint": body["endpoint"],
                                          "metadata": body.get("metadata"), "request_counts": {"total": 0, "completed": 0, "failed": 0}}
            return 200, self._public(batch_id)
        if method == "GET" and path.startswith("/v1/batches?"):
            return 200, {"object": "list", "data": [self._public(b) for b in self.batches]}
        if method == "GET" and path.startswith("/v1/batches/"):
            batch_id = path.split("/")[3]
            if batch_id not in self.batches:
                return 404, {"error": {"message": f"no batch {batch_id}"}}
            self._advance(batch_id)
            return 200, self._public(batch_id)
        if method == "POST":
            return self.post(path, body)
        return 404, {"error": {"message": f"unknown route {method} {path}"}}

    def _public(self, batch_id: str) -> dict:
        return {k: v for k, v in self.batches[batch_id].items() if k != "polls"}

    def _advance(self, batch_id: str) -> None:
        """validating -> in_progress -> (after `batch_polls` polls) finalizing while the job runs in
        a thread of its own (polls keep answering at once) -> its final status."""
        with self._lock:
            batch = self.batches[batch_id]
            if batch["status"] not in ("validating", "in_progress"):
                return
            batch["polls"] += 1
            batch["status"] = "in_progress" if batch["polls"] < self.batch_polls else "finalizing"
            if batch["status"] == "in_progress":
                return
        worker = threading.Thread(target=self._run_job, args=(batch,), daemon=True)
        worker.start()
        worker.join(0.5)  # small jobs are done by the time this poll answers

    def _run_job(self, batch: dict) -> None:
        lines = [json.loads(line) for line in self.files[batch["input_file_id"]].decode().splitlines() if line.strip()]
        out, errors = [], []
        for line in lines:
            if line["custom_id"] in self.batch_fail:
                errors.append({"custom_id": line["custom_id"], "response": None,
                               "error": {"code": "server_error", "message": "scripted batch failure"}})
                continue
            try:
                status, answer = self.post(line["url"], line["body"])
            except Exception as err:  # e.g. the upstream timed out: this request fails in the job, as on OpenAI
                errors.append({"custom_id": line["custom_id"], "response": None, "error": {"code": "server_error", "message": str(err)}})
                continue
            out.append({"id": f"req-{line['custom_id']}", "custom_id": line["custom_id"], "error": None,
                        "response": {"status_code": status, "request_id": line["custom_id"], "body": answer}})
        with self._lock:
            batch["status"] = self.batch_end
            batch["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(errors)}
            if self.batch_end == "completed":
                for kind, items in (("output_file_id", out), ("error_file_id", errors)):
                    if items:
                        file_id = f"file-{len(self.files) + 1}"
                        self.files[file_id] = "".join(json.dumps(i) + "\n" for i in items).encode()
                        batch[kind] = file_id


def _multipart_file(raw: bytes, content_type: str) -> bytes:
    message = email.parser.BytesParser().parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    for part in message.get_payload():
        if part.get_param("name", header="content-disposition") == "file":
            return part.get_payload(decode=True)
    raise ValueError("no file part in the upload")


def _handler_for(fake: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like real servers, so "drop" hits a pooled connection

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            content_type = self.headers.get("Content-Type") or ""
            body = json.loads(raw) if raw and content_type.startswith("application/json") else {}
            fault = fake._next_fault({"method": method, "path": self.path, "headers": dict(self.headers), "body": body})
            if fault == "drop":
                self.close_connection = True  # close the socket without a status line
                return
            if fault == "hang":
                time.sleep(fake.hang_s)
            if fault in ("500", "429", "400", "404"):
                return self._send(int(fault), b'{"error": {"message": "scripted failure"}}')
            if fault == "badjson":
                return self._send(200, b'{"choices": [ this is not json')
            status, answer = fake._answer(method, self.path, body, raw, content_type)
            payload = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
            if fault == "headdrip":
                return self._drip_headers(status, payload)
            self._send(status, payload, drip=fault == "drip")

        def _drip_headers(self, status: int, payload: bytes) -> None:
            """The status line and headers one byte every `drip_s` (a padding header makes them long)."""
            head = (f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                    f"X-Padding: {'x' * 200}\r\n\r\n").encode()
            try:
                for byte in head:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(fake.drip_s)
                self.wfile.write(payload)
            except OSError:  # the client gave up and closed its end
                pass
            self.close_connection = True

        def _send(self, status: int, payload: bytes, drip: bool = False) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                for start in range(0, len(payload), 1 if drip else len(payload) or 1):
                    self.wfile.write(payload[start : start + 1] if drip else payload)
                    self.wfile.flush()
                    time.sleep(fake.drip_s if drip else 0)
            except OSError:  # the client gave up (timeout) and closed its end
                self.close_connection = True

    return Handler
