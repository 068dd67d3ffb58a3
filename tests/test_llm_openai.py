"""The OpenAI-compatible backend: against a real llama-cpp-python server, and a scripted fake for faults."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest

from fake_openai_server import FakeOpenAIServer
from gecko.llm import GenerationParams, LLMError, open_backend
from gecko.llm.openai import OpenAILLM

# --- against a real server ------------------------------------------------------------

ALIAS = "gemma3-270m"

# Greedy text must match in-process llama.cpp. Prompts chosen without near-ties at any step:
# the server runs with logits_all (needed for echo logprobs) and reuses its KV prefix across
# requests, so its logits differ from in-process ones by up to ~0.1 nat, which flips greedy
# picks at near-ties (e.g. "The chemical symbol for gold is" -> " Au" or " gold" depending on
# what the server evaluated before).
GREEDY_PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4, 5,", "Monday, Tuesday, Wednesday,"]

SCORE_PAIRS = [
    ("The capital of France is", " Paris, the largest city in the country."),
    ("The capital of France is", " Lyon, which is a big city."),
    ("Water boils at", " one hundred degrees Celsius at sea level."),
]

# Both sides run Q4_K weights, and llama.cpp's CPU matmul kernels depend on batch composition:
# the server evaluates the prompt plus its last token with logits for every row (or reuses rows
# cached from the previous request), in-process evaluates only up to the last input. Measured on
# these pairs with the native build `make` uses (AVX-512, no AMX): mean per-token |Δ| 0.077 nat,
# max 0.44 (" Paris": server -2.40, in-process -2.84, float32 transformers -2.48: the in-process
# Q4 is the one 0.36 nat off there). A misaligned parse (logprobs shifted by one token) gives a
# mean |Δ| of 2.3 nat on the same pairs, which the test also checks, so the mean is the
# discriminating figure and the max only guards against one wild token.
MEAN_TOKEN_TOL = 0.15
PER_TOKEN_TOL = 0.8
# The label test keeps its own, tighter limit: measured |Δ| 0.04 (" yes") and 0.12 (" no").
LABEL_TOL = 0.3
# Greedy texts: with the native build the server and in-process runs diverge at a near-tie
# after ~10 tokens on "The capital of France is" ("... France. It is the largest" vs "... It is
# the capital"), so the first GREEDY_AGREE tokens must match exactly, not the whole text.
GREEDY_AGREE = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """llama-cpp-python's OpenAI server on the packaged GGUF, one thread (the machine is shared)."""
    pytest.importorskip("llama_cpp.server")
    from gecko.models import default_gguf_path

    port = _free_port()
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(default_gguf_path()), "--model_alias", ALIAS,
        "--n_threads", "1", "--n_threads_batch", "1",  # batch threads default to 2
        "--n_ctx", "2048", "--logits_all", "true",  # echo logprobs need logits for every position
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama_cpp.server did not answer /v1/models within 120 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def remote(server_url):
    # llama-cpp-python's server defaults to repeat_penalty 1.1; the in-process backend uses 1.0
    llm = OpenAILLM(server_url, extra_body={"repeat_penalty": 1.0})
    yield llm
    llm.close()


def test_model_name_comes_from_the_server(remote, server_url):
    assert remote.model == ALIAS
    assert remote.identity == f"openai:{server_url}#{ALIAS}"


def test_greedy_generation_matches_in_process(remote, llamacpp):
    params = GenerationParams(max_tokens=16, temperature=0.0)
    served = remote.generate(GREEDY_PROMPTS, params)
    local = [llamacpp.generate([p], params)[0] for p in GREEDY_PROMPTS]
    for a, b in zip(served, local):
        assert llamacpp.tokenize(a, bos=False)[:GREEDY_AGREE] == llamacpp.tokenize(b, bos=False)[:GREEDY_AGREE]
    assert all(text.strip() for text in served)


def test_score_matches_in_process(remote, llamacpp):
    deltas, shifted = [], []
    for prefix, continuation in SCORE_PAIRS:
        (served,) = remote.score(prefix, [continuation])
        (local,) = llamacpp.score(prefix, [continuation])
        assert served.tokens == local.tokens
        assert len(served.tokens) >= 7
        deltas += [abs(a - b) for a, b in zip(served.logprobs, local.logprobs)]
        shifted += [abs(a - b) for a, b in zip(served.logprobs[1:], local.logprobs)]
        assert served.total == pytest.approx(sum(served.logprobs))
    mean, worst, mean_shifted = sum(deltas) / len(deltas), max(deltas), sum(shifted) / len(shifted)
    print(f"server vs in-process: mean per-token |Δ| {mean:.3g} nat, max {worst:.3g}; shifted by one: mean {mean_shifted:.3g}")
    assert mean <= MEAN_TOKEN_TOL < mean_shifted
    assert worst <= PER_TOKEN_TOL


def test_label_logprobs_match_in_process(remote, llamacpp):
    prompt, labels = "Is the sky blue? Answer:", [" yes", " no"]
    served = remote.label_logprobs(prompt, labels).logprobs
    local = llamacpp.label_logprobs(prompt, labels).logprobs
    print(f"label logprobs: server {served}, in-process {local}")
    assert served.keys() == local.keys()
    for label in labels:
        assert served[label] == pytest.approx(local[label], abs=LABEL_TOL)


# --- against the scripted fake ---------------------------------------------------------


@pytest.fixture
def fake():
    with FakeOpenAIServer(hang_s=1.0) as server:
        yield server


def _client(fake: FakeOpenAIServer, **options) -> OpenAILLM:
    options = {"timeout": 0.3, "max_retries": 3, "backoff": 0.01, **options}
    return OpenAILLM(fake.url, "fake-model", **options)


def _completions(fake: FakeOpenAIServer) -> list[dict]:
    return [r for r in fake.requests if r["path"] == "/v1/completions"]


@pytest.mark.parametrize("fault", ["500", "429", "hang", "drop", "badjson"])
def test_transient_faults_are_retried_until_success(fake, fault):
    fake.script = [fault, fault]
    llm = _client(fake)
    assert llm.generate(["hi"], GenerationParams(max_tokens=2)) == ["ok"]
    assert len(_completions(fake)) == 3


@pytest.mark.parametrize(
    "fault, words",
    [("500", "HTTP 500"), ("hang", "timed out"), ("drop", "connection failed"), ("badjson", "bad response body")],
)
def test_persistent_faults_give_a_clear_error(fake, fault, words):
    fake.script = [fault] * 10
    llm = _client(fake, max_retries=2)
    with pytest.raises(LLMError) as info:
        llm.generate(["hi"], GenerationParams())
    message = str(info.value)
    assert f"{fake.url}/completions" in message and words in message and "3 attempts" in message
    assert len(_completions(fake)) == 3


def test_client_errors_are_not_retried(fake):
    fake.script = ["400"]
    llm = _client(fake)
    with pytest.raises(LLMError, match=r"HTTP 400.*scripted failure") as info:
        llm.generate(["hi"], GenerationParams())
    assert fake.url in str(info.value)
    assert len(_completions(fake)) == 1


def test_request_carries_the_generation_params(fake):
    llm = _client(fake, extra_body={"top_k": 1})
    llm.generate(["a", "b"], GenerationParams(max_tokens=5, temperature=0.7, top_p=0.9, stop=("\n",), seed=3))
    bodies = [r["body"] for r in _completions(fake)]
    assert [b["prompt"] for b in bodies] == ["a", "b"]
    assert bodies[0] == {
        "model": "fake-model", "top_k": 1, "prompt": "a",
        "max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "stop": ["\n"], "seed": 3,
    }  # fmt: skip


def test_spec_without_model_asks_the_server(fake):
    llm = open_backend(f"openai:{fake.url}", timeout=1.0)
    assert llm.identity == f"openai:{fake.url}#fake-model"
    assert fake.requests[0]["method"] == "GET" and fake.requests[0]["path"] == "/v1/models"


@pytest.mark.parametrize("var", ["GECKO_OPENAI_API_KEY", "OPENAI_API_KEY"])
def test_api_key_is_sent_as_bearer(fake, monkeypatch, var):
    for name in ("GECKO_OPENAI_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(var, "sekret")
    _client(fake).generate(["hi"], GenerationParams())
    headers = {k.lower(): v for k, v in fake.requests[-1]["headers"].items()}
    assert headers["authorization"] == "Bearer sekret"


def test_no_api_key_no_header(fake, monkeypatch):
    for name in ("GECKO_OPENAI_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    _client(fake).generate(["hi"], GenerationParams())
    assert "authorization" not in {k.lower() for k in fake.requests[-1]["headers"]}


def _echo_response(body: dict) -> dict:
    """llama-cpp-python's shape: BOS left out, first token's logprob null, one generated token (no usage here)."""
    assert body["echo"] is True and body["prompt"] == "Answer: yes please"
    tokens = ["Answer", ":", " yes", " please", "!"]
    return {
        "choices": [{
            "text": body["prompt"] + "!",
            "logprobs": {
                "tokens": tokens,
                "token_logprobs": [None, -1.0, -2.0, -3.0, -0.5],
                "text_offset": [0, 6, 7, 11, 18],
                "top_logprobs": [None, {":": -1.0}, {" yes": -2.0}, {" please": -3.0}, {"!": -0.5}],
            },
        }]
    }  # fmt: skip


def _vllm_echo_response(body: dict) -> dict:
    """vLLM's echo shape: BOS echoed as text, so every offset is shifted by its length; usage says 1 generated."""
    assert body["echo"] is True and body["prompt"] == "Answer: yes please"
    return {
        "choices": [{
            "text": body["prompt"] + "!",
            "logprobs": {
                "tokens": ["<bos>", "Answer", ":", " yes", " please", "!"],
                "token_logprobs": [None, -5.0, -1.0, -2.0, -3.0, -0.5],
                "text_offset": [0, 5, 11, 12, 16, 23],
                "top_logprobs": None,
            },
        }],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }  # fmt: skip


def _vllm_prompt_logprobs_response(body: dict) -> dict:
    """vLLM's prompt_logprobs shape: None for the first (BOS) position, then {token_id: {logprob, rank, decoded_token}}."""
    assert body["prompt_logprobs"] == 0 and "echo" not in body and body["prompt"] == "Answer: yes please"
    pieces = [("2", "Answer", -5.0), ("3", ":", -1.0), ("4", " yes", -2.0), ("5", " please", -3.0)]
    return {
        "choices": [{
            "text": "!",
            "prompt_logprobs": [None] + [{tid: {"logprob": lp, "rank": 1, "decoded_token": tok}} for tid, tok, lp in pieces],
        }]
    }  # fmt: skip


SCORE_SHAPES = [("echo", _echo_response), ("echo", _vllm_echo_response), ("prompt_logprobs", _vllm_prompt_logprobs_response)]


@pytest.mark.parametrize("mode, responder", SCORE_SHAPES)
def test_score_keeps_only_the_continuation_tokens(fake, mode, responder):
    fake.responder = responder
    llm = _client(fake, score_mode=mode)
    (score,) = llm.score("Answer:", [" yes please"])
    assert score.tokens == [" yes", " please"] and score.logprobs == [-2.0, -3.0]
    # a token straddling the boundary (" yes" after "Answer: ") belongs to the continuation
    (score,) = llm.score("Answer: ", ["yes please"])
    assert score.tokens == [" yes", " please"]
    labels = llm.label_logprobs("Answer:", [" yes please"])
    assert labels.logprobs == {" yes please": -5.0}


@pytest.mark.parametrize("mode, responder", SCORE_SHAPES[1:])
def test_score_with_empty_prefix_when_bos_is_listed(fake, mode, responder):
    fake.responder = responder
    (score,) = _client(fake, score_mode=mode).score("", ["Answer: yes please"])
    assert score.tokens == ["Answer", ":", " yes", " please"] and score.total == -11.0


def test_score_without_a_first_logprob_is_an_error(fake):
    fake.responder = _echo_response
    with pytest.raises(LLMError, match="non-empty prefix"):
        _client(fake).score("", ["Answer: yes please"])


def test_malformed_logprobs_are_retried_then_reported(fake):
    fake.responder = lambda body: {"choices": [{"text": "x", "logprobs": None}]}
    with pytest.raises(LLMError, match="bad response body"):
        _client(fake, max_retries=1).score("Answer:", [" yes"])
    assert len(_completions(fake)) == 2


def test_unknown_score_mode_is_rejected():
    with pytest.raises(ValueError, match="score_mode"):
        OpenAILLM("http://127.0.0.1:9/v1", "m", score_mode="logits")
