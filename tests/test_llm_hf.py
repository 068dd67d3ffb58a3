"""The transformers backend on the packaged Gemma 3 270M GGUF: against llama.cpp and against its own full forward."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gecko.llm import open_backend
from gecko.llm.engine import choose_engine
from gecko.llm.base import GenerationParams, JointRequest, score_and_label_by_parts
from gecko.llm.hf import TransformersLLM
from gecko.llm.llamacpp import LlamaCppLLM
from gecko.models import default_gguf_path


# (passage, query) pairs: ~100-token passages, ~10-token queries
PAIRS = [
    (
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the engineer "
        "Gustave Eiffel, whose company designed and built the tower between 1887 and 1889 as the centerpiece of the World's Fair. "
        "Although it was criticised by some of France's leading artists and intellectuals for its design, it has become a global "
        "cultural icon of France and one of the most recognisable structures in the world.",
        " When was the Eiffel Tower in Paris built?",
    ),
    (
        "Honey bees collect nectar from flowers and store it in a special stomach called the crop. Back at the hive, worker bees "
        "pass the nectar from mouth to mouth, adding enzymes that break complex sugars into simpler ones. The bees then deposit it "
        "into wax cells and fan it with their wings to evaporate most of the water. When the honey is thick enough, they seal each "
        "cell with a cap of beeswax to keep it for the winter.",
        " How do bees turn flower nectar into honey?",
    ),
    (
        "Photosynthesis is the process by which green plants, algae and some bacteria convert light energy into chemical energy. "
        "In the chloroplasts, chlorophyll absorbs sunlight, which drives the splitting of water molecules and releases oxygen as a "
        "by-product. The energy captured is used to fix carbon dioxide from the air into glucose through the Calvin cycle. This "
        "sugar fuels the growth of the plant and, directly or indirectly, almost all life on Earth.",
        " What do plants produce during photosynthesis?",
    ),
    (
        "The Python programming language was created by Guido van Rossum and first released in 1991. Its design philosophy "
        "emphasises code readability, using significant indentation instead of braces to delimit blocks. Python is dynamically "
        "typed and garbage-collected, and it supports several programming paradigms, including procedural, object-oriented and "
        "functional programming. Its large standard library and the package index have made it popular for web development, data "
        "science and automation.",
        " Who created the Python programming language?",
    ),
    (
        "Mount Everest, known in Nepali as Sagarmatha, is Earth's highest mountain above sea level, located in the Mahalangur Himal "
        "sub-range of the Himalayas. The border between China and Nepal runs across its summit point, at an elevation of 8,849 "
        "metres. The first confirmed ascent was made in 1953 by Tenzing Norgay and Edmund Hillary. Climbers face altitude sickness, "
        "extreme weather and avalanches, and more than three hundred people have died on the mountain.",
        " How high is the summit of Mount Everest?",
    ),
]


@pytest.fixture(scope="module")
def hf() -> TransformersLLM:
    return TransformersLLM("default", dtype="float32", n_threads=1)  # float32: exact comparisons


@pytest.fixture(scope="module")
def llama() -> LlamaCppLLM:
    return LlamaCppLLM("default", n_threads=1)


def full_forward_logprobs(llm: TransformersLLM, prefix: str, continuation: str) -> list[float]:
    """Reference: one plain forward of the model over prefix + continuation, its own logits and head."""
    prefix_ids, cont_ids = llm.tokenize(prefix, bos=True), llm.tokenize(continuation, bos=False)
    with torch.inference_mode():
        logits = llm.model(torch.tensor([prefix_ids + cont_ids]), logits_to_keep=len(cont_ids) + 1).logits[0, :-1]
    rows = torch.log_softmax(logits.float(), dim=-1)
    return [float(rows[j, t]) for j, t in enumerate(cont_ids)]


def test_identity_and_dtype(hf):
    assert hf.identity.startswith("transformers:") and hf.identity.endswith(":float32")
    assert hf.model.dtype == torch.float32
    with pytest.raises(ValueError):
        TransformersLLM("default", dtype="float16")


def test_tokenizer_matches_llamacpp(hf, llama):
    texts = [
        "Hello world",
        "  two spaces\n\nnewlines\ttab",
        "Numbers 12345 and 3.14159",
        "Ünïcödé 日本語 emoji 🙂",
        "<start_of_turn>user\nhi<end_of_turn> <bos>",  # special-token text stays literal, as in llama.cpp
        "trailing space ",
        PAIRS[0][0],
    ]
    for text in texts:
        assert hf.tokenize(text, bos=False) == llama.tokenize(text, bos=False), text
        assert hf.tokenize(text, bos=True) == llama.tokenize(text, bos=True), text


def test_scores_agree_with_llamacpp(hf, llama):
    """Same tokens; log-probabilities close but not equal, and the same ranking.

    transformers runs the Q4_K_M weights dequantized to float32, llama.cpp multiplies Q4_K/Q5_0/Q6_K
    weights with Q8-quantized activations. Measured over these 5 passages x 2 queries (82 tokens):
    max per-token |delta| 0.50, mean 0.085 nats. (Against llama.cpp on the same weights written as an
    F32 GGUF the gap is ~100x smaller, see below: the difference is llama.cpp's quantized compute.)
    """
    deltas = []
    totals = {"hf": np.zeros((5, 5)), "llama": np.zeros((5, 5))}  # [passage, query]
    for i, (passage, _) in enumerate(PAIRS):
        queries = {j: PAIRS[j][1] for j in (i, (i + 1) % 5)}  # its own query and an unrelated one
        ours, theirs = hf.score(passage, list(queries.values())), llama.score(passage, list(queries.values()))
        for j, a, b in zip(queries, ours, theirs):
            assert a.tokens == b.tokens
            deltas += [abs(x - y) for x, y in zip(a.logprobs, b.logprobs)]
            totals["hf"][i, j], totals["llama"][i, j] = a.total, b.total
    max_delta, mean_delta = max(deltas), float(np.mean(deltas))
    print(f"transformers vs llama.cpp over {len(deltas)} tokens: max |delta| {max_delta:.3f}, mean {mean_delta:.3f}")
    assert max_delta < 0.55
    assert mean_delta < 0.1
    for i in range(5):  # query i scored after its own passage vs after passage i-1
        own, other = i, (i - 1) % 5
        for name, t in totals.items():
            assert t[own, i] > t[other, i], (name, i)


def test_prefix_reuse_equals_full_forward(hf, monkeypatch):
    """Batched continuations against one cached prefix == a plain forward, also past the 512-token sliding window."""
    continuations = [PAIRS[1][1], " x", "", PAIRS[3][1] + " And why?", "\n"]
    long_passage = " ".join(p for p, _ in PAIRS) + " " + PAIRS[0][0] + " " + PAIRS[1][0]
    assert len(hf.tokenize(long_passage, bos=True)) > 600  # sliding-window layers see only the last 512
    for prefix, checked in ((PAIRS[1][0], continuations), (long_passage, continuations[2:4])):
        scores = hf.score(prefix, continuations)
        for cont, score in zip(continuations, scores):
            assert score.tokens == [hf.tokenizer.decode([t]) for t in hf.tokenize(cont, bos=False)]
            if cont in checked:  # the long reference forwards are slow on one core: the longest and the empty one
                assert score.logprobs == pytest.approx(full_forward_logprobs(hf, prefix, cont) if cont else [], abs=1e-4), cont
    monkeypatch.setattr("gecko.llm.hf.PACK_TOKENS", 12)  # several small packs give the same numbers
    for again, score in zip(hf.score(long_passage, continuations), scores):
        assert again.logprobs == pytest.approx(score.logprobs, abs=1e-4)


@pytest.fixture(scope="module")
def float_gguf(tmp_path_factory):
    """The packaged GGUF with every tensor dequantized to F32: the weights transformers runs, for llama.cpp."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(default_gguf_path())
    path = tmp_path_factory.mktemp("gguf") / "gemma-f32.gguf"
    writer = gguf.GGUFWriter(path, arch=reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        kind = field.types[0]
        value = 0 if field.name == "general.file_type" else field.contents()  # 0: all F32
        writer.add_key_value(field.name, value, kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, weights, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    yield path
    path.unlink()  # 1 GB


def test_scores_match_llamacpp_on_float_weights(hf, float_gguf):
    """With llama.cpp computing in float on the same weights, the two backends agree closely.

    Measured over the 5 passage/query pairs (41 tokens): max per-token |delta| 0.0044, mean 0.0008
    with the portable llama.cpp build; mean 0.0014 with the native AVX-512 build; max 0.0077, mean
    0.0013 with the native build without AMX kernels on a Xeon with AMX (what `make` builds there).
    """
    llama = LlamaCppLLM(float_gguf, n_threads=1)
    deltas = []
    for passage, query in PAIRS:
        ((a,), (b,)) = hf.score(passage, [query]), llama.score(passage, [query])
        deltas += [abs(x - y) for x, y in zip(a.logprobs, b.logprobs)]
    print(f"transformers vs llama.cpp on F32 weights over {len(deltas)} tokens: max |delta| {max(deltas):.4f}, mean {np.mean(deltas):.4f}")
    assert max(deltas) < 0.01
    assert np.mean(deltas) < 0.002


def test_label_logprobs_exact(hf):
    prompt = PAIRS[2][0] + "\nIs this passage about biology? Answer yes or no:"
    labels = [" yes", " no", " maybe"]
    got = hf.label_logprobs(prompt, labels)
    ids = hf.tokenize(prompt, bos=True)
    with torch.inference_mode():
        row = torch.log_softmax(hf.model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
    for label in labels:
        (token,) = hf.tokenize(label, bos=False)
        assert got.logprobs[label] == pytest.approx(float(row[token]), abs=1e-4)
    multi = hf.label_logprobs(prompt, [" yes", " photosynthesis research"])  # multi-token: by scoring
    assert multi.logprobs[" yes"] == pytest.approx(got.logprobs[" yes"], abs=1e-4)
    assert multi.logprobs[" photosynthesis research"] == pytest.approx(hf.score(prompt, [" photosynthesis research"])[0].total)


def test_greedy_generate_is_deterministic_and_new_text_only(hf):
    prompt = "Question: What is the capital of France?\nAnswer:"
    params = GenerationParams(max_tokens=12)
    first = hf.generate([prompt, "The quick brown fox"], params)
    assert first == hf.generate([prompt, "The quick brown fox"], params)
    assert all(text and not text.startswith(prompt) for text in first)
    assert len(hf.tokenize(first[0], bos=False)) <= 12
    stopped = hf.generate([prompt], GenerationParams(max_tokens=12, stop=("\n",)))[0]
    assert "\n" not in stopped and first[0].startswith(stopped)
    sampled = GenerationParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=3)
    assert hf.generate([prompt], sampled) == hf.generate([prompt], sampled)  # seeded


def test_folder_and_bfloat16(hf):
    """A plain model folder (here the cached conversion) loads; bf16 scores stay near float32.

    Measured over the 5 passage/query pairs (41 tokens): max per-token |delta| 0.14, mean 0.024.
    """
    folder = hf.model.name_or_path  # gecko_home()/hf/<gguf sha>: what the GGUF was converted into
    bf16 = TransformersLLM(folder, dtype="bfloat16", n_threads=1)
    assert bf16.identity.startswith("transformers:") and bf16.identity.endswith(":bfloat16")
    assert bf16.identity.split(":")[1] != hf.identity.split(":")[1]  # safetensors, not GGUF, bytes
    deltas = []
    for passage, query in PAIRS:
        ((a,), (b,)) = hf.score(passage, [query]), bf16.score(passage, [query])
        assert a.tokens == b.tokens
        deltas += [abs(x - y) for x, y in zip(a.logprobs, b.logprobs)]
    print(f"bfloat16 vs float32 over {len(deltas)} tokens: max |delta| {max(deltas):.3f}, mean {np.mean(deltas):.3f}")
    assert max(deltas) < 0.16
    assert np.mean(deltas) < 0.03


LONG = " ".join(p for p, _ in PAIRS) + " " + PAIRS[0][0] + " " + PAIRS[1][0]  # > 600 tokens: past the sliding window


def test_joint_scores_equal_the_full_forward_and_the_separate_calls(hf):
    """QL + RC in one batched pass after a kept few-shot root == plain forwards of the whole text,
    also when the text is longer than the 512-token sliding window; fewer tokens than by parts."""
    prefix = PAIRS[4][0] + "\n\n"
    requests = [JointRequest(f"Passage: {ctx}\nQuery:", q, "\nRelevant:", (" Yes", " No"))
                for ctx in (PAIRS[2][0], LONG) for q in (PAIRS[2][1], PAIRS[0][1], " x")]
    before = hf.evaluated_tokens
    joint = hf.score_and_label(prefix, requests)
    joint_tokens = hf.evaluated_tokens - before
    before = hf.evaluated_tokens
    parts = score_and_label_by_parts(hf, prefix, requests)
    assert hf.evaluated_tokens - before > 2 * joint_tokens
    for r, a, b in zip(requests, joint, parts):
        assert a.continuation.tokens == b.continuation.tokens
        assert a.continuation.logprobs == pytest.approx(b.continuation.logprobs, abs=1e-4)
        assert a.labels.logprobs == pytest.approx(b.labels.logprobs, abs=1e-4)
    long_one = requests[4]
    reference = full_forward_logprobs(hf, prefix + long_one.context, long_one.continuation)
    assert joint[4].continuation.logprobs == pytest.approx(reference, abs=1e-4)


def test_batched_generation_equals_one_prompt_at_a_time(hf):
    """Prompts decoded together (shared root, length-sorted prefill, finished rows dropped) give the
    texts each gives alone; sampling draws from each prompt's own stream."""
    block = "".join(f"Passage: {p}\nQuestion:{q}\n\n" for p, q in PAIRS[:3])
    prompts = [f"{block}Passage: {p}\nQuestion:" for p, _ in PAIRS[3:]] + [f"{block}Passage: {PAIRS[0][0][:90]}\nQuestion:"]
    for params in (GenerationParams(max_tokens=10, stop=("\n",)), GenerationParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=5)):
        together = hf.generate(prompts, params)
        hf.reset()
        alone = [hf.generate([p], params)[0] for p in prompts]
        assert together == alone, params
        assert all(t.strip() for t in together)


def test_a_retried_prompt_is_not_evaluated_again(hf):
    """generate keeps the prefill of its last call: the same prompts with another seed (a retry)
    evaluate only the new tokens, and give what a fresh backend gives."""
    prompts = [f"Passage: {p}\nQuestion:" for p, _ in PAIRS[:2]]
    hf.generate(prompts, GenerationParams(max_tokens=6, temperature=0.9, seed=1))
    before = hf.evaluated_tokens
    retried = hf.generate(prompts[1:], GenerationParams(max_tokens=6, temperature=0.9, seed=2))
    assert hf.evaluated_tokens - before <= 6
    hf.reset()
    assert retried == hf.generate(prompts[1:], GenerationParams(max_tokens=6, temperature=0.9, seed=2))


def test_default_engine_is_measured_cached_and_can_be_overridden(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("GECKO_HOME", str(tmp_path))
    monkeypatch.setattr("gecko.llm.engine._announced", False)
    for name in ("GECKO_LLM_BACKEND", "GECKO_LLM_DTYPE"):
        monkeypatch.delenv(name, raising=False)
    choice = choose_engine(threads=1)
    (saved,) = json.loads((tmp_path / "engine.json").read_text()).values()  # one entry per machine and thread count
    assert saved["backend"] == choice.backend and "bf16 matmul" in choice.reason
    if not torch.cuda.is_available():
        assert (choice.backend == "transformers") == (choice.dtype == "bfloat16")
    # cached: a second choice measures nothing (a calibration that would fail is never called)
    monkeypatch.setattr("gecko.llm.engine.measure_bf16_speedup", lambda *a, **k: 1 / 0)
    assert choose_engine(threads=1) == choice
    # the identity the pipeline records names the engine that runs
    from gecko.pipeline.run import llm_identity

    assert llm_identity("default").startswith(choice.backend + ":")
    monkeypatch.setenv("GECKO_LLM_BACKEND", "llamacpp")
    assert open_backend("default", n_threads=1).identity.startswith("llamacpp:")
    assert "LLM engine llamacpp (GECKO_LLM_BACKEND)" in capsys.readouterr().err
    assert llm_identity("default").startswith("llamacpp:")
    monkeypatch.setenv("GECKO_LLM_BACKEND", "transformers")
    monkeypatch.setenv("GECKO_LLM_DTYPE", "float32")
    assert choose_engine().dtype == "float32" and llm_identity("default").endswith(":float32")
    monkeypatch.setenv("GECKO_LLM_BACKEND", "vllm")
    with pytest.raises(ValueError, match="GECKO_LLM_BACKEND"):
        open_backend("default")
