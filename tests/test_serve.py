"""`gecko serve`: a real server process, spoken to with the official openai client and httpx."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from gecko.cli import build_parser  # noqa: E402
from gecko.embed import Embedder  # noqa: E402
from gecko.serve import MicroBatcher, ServeConfig, create_app  # noqa: E402

KEY = "sk-test-gecko"
DOCS = [
    {"_id": "cats", "title": "Cats", "text": "Cats purr when they are content and sleep most of the day."},
    {"_id": "paris", "title": "Paris", "text": "Paris is the capital and largest city of France."},
    {"_id": "python", "title": "", "text": "Python is a programming language that emphasises readability."},
]
TEXTS = ["the weather is lovely today", "a short one", "embedding models map text to vectors " * 5]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def encoder() -> Embedder:
    return Embedder(cache=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`gecko serve` in a subprocess on a free port (default host), key from GECKO_API_KEY; yields its base URL."""
    tmp = tmp_path_factory.mktemp("serve")
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    port = _free_port()
    env = {**os.environ, "GECKO_API_KEY": KEY, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GECKO_HOME": str(tmp / "home")}
    cmd = [sys.executable, "-m", "gecko.cli", "serve", "--port", str(port), "--corpus", str(corpus),
           "--max-inputs", "8", "--max-chars", "300"]
    log = (tmp / "server.log").open("w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            pytest.fail(f"server did not come up:\n{log.read()}")
        time.sleep(0.25)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.seek(0)
    assert "Traceback" not in log.read()  # nothing failed inside the server either


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_openai_client_gets_the_models_embeddings(client, encoder):
    expected = encoder.model.encode(TEXTS, normalize_embeddings=True)
    got = client.embeddings.create(model="default", input=TEXTS)  # the client asks for base64 and decodes it
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == "default"
    assert np.allclose([d.embedding for d in got.data], expected, atol=1e-5)
    assert got.usage.prompt_tokens == got.usage.total_tokens > len(TEXTS)
    floats = client.embeddings.create(model="default", input=TEXTS[0], encoding_format="float")
    assert np.allclose(floats.data[0].embedding, expected[0], atol=1e-5)
    small = client.embeddings.create(model="default", input=TEXTS, dimensions=64)
    small_emb = np.array([d.embedding for d in small.data])
    assert small_emb.shape == (3, 64) and np.allclose(small_emb, _unit(expected[:, :64]), atol=1e-5)  # Matryoshka
    assert [m.id for m in client.models.list()] == ["default"]


def test_search_returns_top_k_ids_and_cosine_scores(server, encoder):
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{server}/v1/search", json={"query": ["what is the capital of France?", "purring pets"], "top_k": 2},
                   headers=headers)
    assert r.status_code == 200, r.text
    first, second = r.json()["data"]
    assert [hit["id"] for hit in first["results"]][0] == "paris" and len(first["results"]) == 2
    assert second["results"][0]["id"] == "cats"
    q = encoder.model.encode("what is the capital of France?", normalize_embeddings=True)
    d = encoder.model.encode("Paris " + DOCS[1]["text"], normalize_embeddings=True)  # title + text, as MTEB joins them
    assert first["results"][0]["score"] == pytest.approx(float(q @ d), abs=1e-4)
    everything = httpx.post(f"{server}/v1/search", json={"query": "code", "top_k": 50}, headers=headers).json()
    scores = [hit["score"] for hit in everything["data"][0]["results"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)


def test_api_key_on_every_route_but_health(server):
    assert httpx.get(f"{server}/healthz").json()["status"] == "ok"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).embeddings.create(model="m", input="x")
    for method, path in (("POST", "/v1/embeddings"), ("POST", "/v1/search"), ("GET", "/v1/models")):
        r = httpx.request(method, f"{server}{path}", json={"input": "x", "query": "x"})  # no key
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b'{"input": "unterminated', 400, None),
        (b'["not", "an", "object"]', 400, None),
        (b'{"model": "m"}', 400, "input"),
        (b'{"input": [1, 2, 3]}', 400, "input"),  # token arrays
        (b'{"input": []}', 400, "input"),
        (b'{"input": "x", "dimensions": 0}', 400, "dimensions"),
        (b'{"input": "x", "encoding_format": "int8"}', 400, "encoding_format"),
        (json.dumps({"input": ["x"] * 9}).encode(), 413, "input"),  # --max-inputs 8
        (json.dumps({"input": ["ok", "y" * 301]}).encode(), 422, "input"),  # --max-chars 300
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(f"{server}/v1/embeddings", content=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert "Traceback" not in r.text


def test_concurrent_clients_all_get_their_own_vectors(client, server, encoder):
    texts = [f"request number {i} about {'cats' if i % 2 else 'stars'}" for i in range(24)]
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda t: client.embeddings.create(model="default", input=t).data[0].embedding, texts))
    assert np.allclose(got, encoder.model.encode(texts, normalize_embeddings=True), atol=1e-5)
    assert httpx.get(f"{server}/healthz").json()["batching"]["requests"] >= len(texts)


def test_requests_arriving_while_the_model_is_busy_share_one_batch(encoder):
    busy, calls = threading.Event(), []

    def embed(texts, prompt):  # the real encoder; the first batch is held until more requests are queued
        calls.append((len(texts), prompt))
        if len(calls) == 1:
            busy.wait(30)
        return encoder.encode_counted(texts, prompt)

    async def scenario():
        batcher = MicroBatcher(embed)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(["one"]))
        while not calls:
            await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(batcher.submit(t)) for t in (["two", "three"], ["four"], ["five"])]
        query = asyncio.ensure_future(batcher.submit(["six"], "task: x | query: "))
        await asyncio.sleep(0.05)
        busy.set()
        results = await asyncio.gather(first, *rest, query)
        await batcher.stop()
        return results, batcher.stats

    results, stats = asyncio.run(scenario())
    assert calls == [(1, None), (4, None), (1, "task: x | query: ")]  # one batch, one model call per prompt
    assert stats["batches"] == 2 and stats["largest_batch_requests"] == 4
    alone, _ = encoder.encode_counted(["two", "three"])
    assert np.allclose(results[1][0], alone, atol=1e-5) and results[2][0].shape == (1, 384)


def test_no_corpus_and_internal_errors_stay_in_shape(encoder):
    from starlette.testclient import TestClient

    class Broken:
        """The real encoder, with a forward pass that fails."""

        def __getattr__(self, name):
            return getattr(encoder, name)

        def encode_counted(self, texts, prompt=None):
            raise RuntimeError("secret internal detail")

    with TestClient(create_app(ServeConfig(), encoder=Broken()), raise_server_exceptions=False) as http:
        r = http.post("/v1/search", json={"query": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_corpus"
        r = http.post("/v1/embeddings", json={"input": "x"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "secret" not in r.text and "Traceback" not in r.text
        assert http.get("/nowhere").json()["error"]["code"] == "not_found"
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"  # loopback unless asked


def test_an_oversized_body_gets_413_whether_its_length_is_declared_or_not(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = json.dumps({"input": "x" * 200_000}).encode()  # over the body cap: 8 inputs x 300 chars + slack = 94,400 bytes

    def chunked():  # no Content-Length: the cap is counted while the body streams in
        for start in range(0, len(body), 16_384):
            yield body[start : start + 16_384]

    for content in (body, chunked()):
        r = httpx.post(f"{server}/v1/embeddings", content=content, headers=headers)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert httpx.post(f"{server}/v1/embeddings", json={"input": "still serving"}, headers=headers).status_code == 200


def test_a_client_hanging_up_mid_body_leaves_no_traceback(server):
    """The server log is checked for tracebacks when the module's server stops."""
    body = json.dumps({"input": ["a text"] * 4}).encode()
    head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + body[: len(body) // 2])
        time.sleep(0.3)
    assert httpx.post(f"{server}/v1/embeddings", json={"input": "after"}, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
