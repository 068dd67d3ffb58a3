"""A scripted stand-in for an OpenAI-compatible server, for fault-injection tests.

Each request takes the next fault from `script` ("500", "429", "400", "hang", "drop",
"badjson"); once the script is empty it answers normally. Every request is recorded, so
tests can count the attempts the client made and inspect what it sent.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class FakeOpenAIServer:
    def __init__(self, model: str = "fake-model", hang_s: float = 1.0):
        self.model = model
        self.hang_s = hang_s
        self.script: list[str] = []
        self.requests: list[dict] = []  # {"method", "path", "headers", "body"}
        self.responder: Callable[[dict], dict] = lambda body: {
            "choices": [{"index": 0, "text": "ok", "logprobs": None, "finish_reason": "length"}]
        }
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

    def _answer(self, method: str, path: str, body: dict) -> dict:
        if method == "GET" and path == "/v1/models":
            return {"object": "list", "data": [{"id": self.model, "object": "model"}]}
        return self.responder(body)


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
            body = json.loads(raw) if raw else {}
            fault = fake._next_fault({"method": method, "path": self.path, "headers": dict(self.headers), "body": body})
            if fault == "drop":
                self.close_connection = True  # close the socket without a status line
                return
            if fault == "hang":
                time.sleep(fake.hang_s)
            if fault in ("500", "429", "400"):
                return self._send(int(fault), b'{"error": {"message": "scripted failure"}}')
            if fault == "badjson":
                return self._send(200, b'{"choices": [ this is not json')
            self._send(200, json.dumps(fake._answer(method, self.path, body)).encode())

        def _send(self, status: int, payload: bytes) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:  # the client gave up (timeout) and closed its end
                self.close_connection = True

    return Handler
