"""The stages on served LLMs, over real HTTP (the fake of tests/fake_openai_server.py): a chat-only
server (generate through chat, RC from top log-probabilities, no QL), the budget, and the Batch API."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from fake_openai_server import FakeOpenAIServer
from gecko.generate import GenerateConfig, run_generate
from gecko.llm import BudgetExceeded, Price
from gecko.llm.cache import CachedLLM, LLMCache
from gecko.llm.openai import OpenAILLM
from gecko.relabel import RelabelConfig, run_relabel

TEXTS = [
    "Aspirin inhibits cyclooxygenase and lowers prostaglandin synthesis in inflamed tissue.",
    "Short sleep duration raises the risk of coronary heart disease in adults.",
    "BRCA1 mutations impair homologous recombination and raise breast cancer risk.",
    "Chloroplasts convert light energy into glucose and release oxygen.",
    "Python lists append in amortised constant time because capacity grows geometrically.",
    "The Peace of Westphalia ended the Thirty Years War in 1648.",
]


def _number(text: str, mod: int) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % mod


def chat_model(body: dict) -> dict:
    """A deterministic chat model: a query about the passage's two longest words, or a Yes/No label
    whose top log-probabilities depend on the prompt (sometimes without "No": an absent label)."""
    prompt = body["messages"][-1]["content"]
    usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": 1 if body.get("logprobs") else 6}
    if body.get("logprobs"):
        yes = -_number(prompt, 40) / 10
        top = [{"token": "Yes", "logprob": yes}, {"token": " maybe", "logprob": -4.5}]
        if _number(prompt, 4):  # one prompt in four: "No" not among the top
            top.append({"token": "No", "logprob": -(4 - yes) / 2})
        return {"choices": [{"message": {"content": "Yes"}, "logprobs": {"content": [{"token": "Yes", "top_logprobs": top}]}}], "usage": usage}
    passage = re.search(r"Passage: (.*)", prompt).group(1)
    longest = sorted(set(re.findall(r"[A-Za-z]{4,}", passage)), key=lambda w: (-len(w), w))[:2]
    return {"choices": [{"message": {"content": f"what is known about {longest[0].lower()} and {longest[1].lower()}?"}}], "usage": usage}


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    return path


@pytest.fixture
def chat_server():
    with FakeOpenAIServer() as fake:
        fake.refuse = {"/v1/completions"}
        fake.chat_responder = chat_model
        yield fake


def _chat_llm(fake, tmp_path, **cost) -> CachedLLM:
    return CachedLLM(OpenAILLM(fake.url, "fake-model", quiet=True, backoff=0.01), LLMCache(tmp_path / "cache.sqlite"), **cost)


def _generations(fake) -> list[str]:
    return [r["body"]["messages"][0]["content"] for r in fake.requests
            if r["path"] == "/v1/chat/completions" and not r["body"].get("logprobs")]


def test_generate_and_relabel_on_a_chat_only_server(chat_server, corpus, tmp_path):
    llm = _chat_llm(chat_server, tmp_path, price=Price(0.15, 0.6))
    generated = tmp_path / "generated.jsonl"
    summary = run_generate(corpus, generated, llm, GenerateConfig(batch_size=3), progress=False)
    assert summary.prompt_style == "chat" and summary.accepted == len(TEXTS)  # the completion style was adapted
    records = [json.loads(line) for line in generated.read_text().splitlines()]
    assert {r["prompt_id"].split("@")[0] for r in records} == {"generate-chat-v1"}
    assert summary.tokens_in > 0 and summary.tokens_out == 6 * len(TEXTS) and summary.cost > 0

    out = tmp_path / "relabeled.jsonl"
    rel = run_relabel(generated, corpus, out, llm, RelabelConfig(top_n=4), progress=False)
    assert rel.ql_unavailable and "completions refused" in rel.ql_unavailable
    assert rel.fusion_used == "weighted:rc=1,retriever=1" and rel.config["weights"] == "ql=1,retriever=1"
    assert "QL unavailable" in rel.render() and "LLM usage" in rel.render()
    assert rel.rc_bounds.get("lower", 0) > 0  # "No" absent from some top lists: counted, RC a lower bound
    examples = [json.loads(line) for line in out.read_text().splitlines()]
    assert examples and all(e["fusion"] == "weighted:rc=1,retriever=1" for e in examples)
    assert all(c["ql"] is None and c["rc"] is not None for e in examples for c in e["candidates"])
    assert rel.cost > 0 and rel.llm_calls == rel.pairs_scored  # one chat call per pair


def test_budget_stops_generate_and_a_rerun_finishes_without_repeating_calls(chat_server, corpus, tmp_path):
    out = tmp_path / "generated.jsonl"
    # each call: ~20-70 prompt tokens at $1,000 / 1M = $0.02-0.07; a batch of 2 passages is 2 calls
    with pytest.raises(BudgetExceeded, match=r"generate stopped: .*max_cost \$0.1.*of 6 passages are journaled"):
        run_generate(corpus, out, _chat_llm(chat_server, tmp_path, price=Price(1000, 0), max_cost=0.1),
                     GenerateConfig(batch_size=2), progress=False)
    done = len(out.with_name(out.name + ".journal").read_text().splitlines())
    assert 0 < done < len(TEXTS) and not out.exists()
    summary = run_generate(corpus, out, _chat_llm(chat_server, tmp_path, price=Price(1000, 0)), GenerateConfig(batch_size=2),
                           progress=False)
    assert summary.accepted == len(TEXTS) and summary.llm_calls == len(TEXTS) - done
    prompts = _generations(chat_server)
    assert len(prompts) == len(set(prompts)) == len(TEXTS)  # no LLM call made twice


def _echo_model(body: dict) -> dict:
    """A completions server that computes prompt log-probabilities (each word's from what precedes it)."""
    words = body["prompt"].replace(" ", "\0 ").split("\0")
    offsets = [sum(map(len, words[:i])) for i in range(len(words))]
    values = [None] + [-(1 + _number(body["prompt"][: offsets[i]], 97) / 10) for i in range(1, len(words))]
    return {"choices": [{"text": body["prompt"] + "!", "logprobs": {
        "tokens": words + ["!"], "token_logprobs": values + [-0.5], "text_offset": offsets + [len(body["prompt"])]}}],
        "usage": {"prompt_tokens": len(words), "completion_tokens": 1}}


def test_relabel_through_the_batch_api_equals_live(corpus, tmp_path):
    generated = tmp_path / "generated.jsonl"
    generated.write_text("".join(json.dumps({"id": f"d{i}:q0", "seed_id": f"d{i}", "task": "Find the passage.",
                                             "query": t.split()[0] + " " + t.split()[-1]}) + "\n" for i, t in enumerate(TEXTS)))
    outputs = {}
    with FakeOpenAIServer() as fake:
        fake.responder = _echo_model
        for batch in (False, True):
            backend = OpenAILLM(fake.url, "fake-model", mode="completions", batch=batch, batch_poll_s=0.01, batch_dir=tmp_path / "jobs")
            llm = CachedLLM(backend, LLMCache(tmp_path / f"cache-{batch}.sqlite"), Price(1.0, 2.0))
            out = tmp_path / f"relabeled-{batch}.jsonl"
            summary = run_relabel(generated, corpus, out, llm, RelabelConfig(top_n=3, fusion="rrf"), progress=False)
            outputs[batch] = (out.read_text(), summary)
        jobs = [r for r in fake.requests if r["method"] == "POST" and r["path"] == "/v1/batches"]
    assert outputs[True][0] == outputs[False][0]
    live, batched = outputs[False][1], outputs[True][1]
    assert len(jobs) == 1  # the whole chunk: one job
    assert batched.tokens_in == live.tokens_in and batched.cost == pytest.approx(live.cost / 2, abs=1e-6)  # half the price


def test_ray_engine_on_chat_only_servers(corpus, tmp_path):
    """Several chat-only servers under `--engine ray`: the actors send the served model's name, the
    records and the manifest carry the same identity (with the probe's `@chat`), the stages adapt
    as locally (chat prompt; RC + retriever), and the driver prices the actors' tokens."""
    ray = pytest.importorskip("ray")
    from gecko.scale import RayConfig, run_generate_ray, run_relabel_ray

    price = Price(1.0, 2.0)
    generated, relabeled = tmp_path / "generated.jsonl", tmp_path / "relabeled.jsonl"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # one Ray for both stages
    try:
        with FakeOpenAIServer() as one, FakeOpenAIServer() as two:
            for fake in (one, two):
                fake.refuse, fake.chat_responder = {"/v1/completions"}, chat_model
            spec, engine = f"openai:{one.url},{two.url}#fake-model", RayConfig(actors=2, num_cpus=0.5)
            gen = run_generate_ray(corpus, generated, spec, GenerateConfig(batch_size=1), engine, cache=tmp_path / "cache.sqlite",
                                   progress=False, prices={"fake-model": price})
            rel = run_relabel_ray(generated, corpus, relabeled, spec, RelabelConfig(top_n=3), engine, cache=tmp_path / "cache.sqlite",
                                  progress=False, prices={"fake-model": price})
            models = {r["body"]["model"] for fake in (one, two) for r in fake.requests if r["method"] == "POST"}
    finally:
        ray.shutdown()
    identity = f"openai:{one.url},{two.url}#fake-model@chat"
    records = [json.loads(line) for part in sorted(generated.glob("part-*")) for line in part.read_text().splitlines()]
    assert json.loads((generated / "manifest.json").read_text())["llm"] == identity and {r["model"] for r in records} == {identity}
    assert json.loads((relabeled / "manifest.json").read_text())["llm"] == identity and models == {"fake-model"}
    assert gen.prompt_style == "chat" and gen.accepted == len(TEXTS) and rel.fusion_used == "weighted:rc=1,retriever=1"
    for summary in (gen, rel):
        assert summary.tokens_in > 0 and summary.cost == pytest.approx(price.cost(summary.tokens_in, summary.tokens_out), abs=1e-6)
