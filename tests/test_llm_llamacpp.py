"""The default backend on the real packaged Gemma 3 270M GGUF."""

from __future__ import annotations

import math

import pytest

from gecko.llm import GenerationParams

FEW_SHOT = (
    "Passage: Aspirin irreversibly inhibits cyclooxygenase, reducing prostaglandin synthesis.\n"
    "Query: how does aspirin reduce inflammation?\n\n"
    "Passage: The Treaty of Westphalia in 1648 ended the Thirty Years' War and established the "
    "principle of state sovereignty in Europe.\nQuery: what ended the thirty years war\n\n"
    "Passage: Photosynthesis converts light energy into chemical energy stored in glucose, "
    "releasing oxygen as a by-product.\nQuery: which gas do plants release during photosynthesis?\n\n"
    "Passage: Python lists are dynamic arrays; appending is amortised constant time.\n"
    "Query: time complexity of list append in python\n\n"
)
PASSAGES = [
    "Vitamin D deficiency is associated with reduced bone mineral density and a higher risk of hip fracture in older adults.",
    "The mitochondrion produces most of the cell's ATP through oxidative phosphorylation across its inner membrane.",
    "Smoking damages the airways and alveoli of the lungs and is the leading cause of lung cancer.",
]
QUERY = " does low vitamin D cause fractures?"

# llama.cpp picks its CPU matmul kernel by batch size (repacked Q4_K GEMM for multi-token
# batches, GEMV for one token, on quantised activations), so a token scored inside a batch and
# the same token decoded alone get slightly different logits. Measured over 24 (SciFact passage
# of ~150 tokens, 3-8 token query) pairs: per token median 0.033, p99 0.30, max 0.41 nat;
# on the sum, median 0.10, max 0.33 nat. Tolerances sit just above the maxima.
PER_TOKEN_TOL = 0.5
TOTAL_TOL = 0.5
MEAN_TOL = 0.15


def test_greedy_generation_is_deterministic(llamacpp):
    params = GenerationParams(max_tokens=12, temperature=0.0)
    first = llamacpp.generate(["The capital of France is"], params)
    llamacpp.generate(["Something else entirely:"], params)  # leaves other tokens in the KV cache
    second = llamacpp.generate(["The capital of France is"], params)
    assert first == second
    assert first[0].strip()


def test_sampling_depends_on_seed_only(llamacpp):
    def sample(seed):
        return llamacpp.generate(["Write a word:"], GenerationParams(max_tokens=8, temperature=1.0, seed=seed))

    assert sample(7) == sample(7)


def test_stop_strings_cut_the_text(llamacpp):
    (text,) = llamacpp.generate(["1, 2, 3, 4,"], GenerationParams(max_tokens=20, stop=(" 7",)))
    assert "7" not in text and "5" in text


@pytest.mark.parametrize("passage", PASSAGES)
def test_score_equals_step_by_step_logprobs(llamacpp, passage):
    prefix = FEW_SHOT + f"Passage: {passage}\nQuery:"
    (scored,) = llamacpp.score(prefix, [QUERY])
    reference = llamacpp.step_by_step_logprobs(prefix, QUERY)
    assert len(scored.logprobs) == len(reference) == len(llamacpp.tokenize(QUERY, bos=False))
    assert "".join(scored.tokens) == QUERY
    assert all(lp <= 0 for lp in scored.logprobs)
    deltas = [abs(a - b) for a, b in zip(scored.logprobs, reference)]
    assert max(deltas) < PER_TOKEN_TOL
    assert sum(deltas) / len(deltas) < MEAN_TOL
    assert abs(scored.total - sum(reference)) < TOTAL_TOL


def test_prefix_reuse_gives_identical_scores(llamacpp):
    """Decoding in chunks at fixed positions makes reuse bit-identical to evaluating afresh."""
    prefixes = [FEW_SHOT + f"Passage: {p}\nQuery:" for p in PASSAGES]
    llamacpp.reset()
    before = llamacpp.evaluated_tokens
    reused = [llamacpp.score(p, [QUERY, " how do cells make energy?"]) for p in prefixes]
    reused_cost = llamacpp.evaluated_tokens - before
    fresh = []
    before = llamacpp.evaluated_tokens
    for p in prefixes:
        llamacpp.reset()
        fresh.append(llamacpp.score(p, [QUERY, " how do cells make energy?"]))
    fresh_cost = llamacpp.evaluated_tokens - before
    assert reused_cost < fresh_cost  # the shared few-shot prefix was not evaluated again
    for a_list, b_list in zip(reused, fresh):
        for a, b in zip(a_list, b_list):
            assert a.tokens == b.tokens
            assert a.logprobs == b.logprobs


def test_query_likelihood_prefers_the_relevant_passage(llamacpp):
    totals = [llamacpp.score(FEW_SHOT + f"Passage: {p}\nQuery:", [QUERY])[0].total for p in PASSAGES]
    assert totals[0] == max(totals)


def test_label_logprobs_are_exact(llamacpp):
    prompt = f"Passage: {PASSAGES[0]}\nQuery:{QUERY}\nRelevant (Yes or No):"
    labels = llamacpp.label_logprobs(prompt, [" Yes", " No"])
    by_scoring = llamacpp.score(prompt, [" Yes", " No"])
    for label, scored in zip([" Yes", " No"], by_scoring):
        assert labels.logprobs[label] == scored.total  # same decode, same logits row
    assert math.isclose(sum(math.exp(v) for v in labels.normalized().values()), 1.0, rel_tol=1e-9)
    multi = llamacpp.label_logprobs(prompt, [" Yes indeed", " No"])  # multi-token label: scored
    assert multi.logprobs[" Yes indeed"] < multi.logprobs.get(" Yes", 0)


def test_batched_generation_shares_the_prefix_and_is_deterministic(llamacpp):
    prompts = [FEW_SHOT + f"Passage: {p}\nQuery:" for p in PASSAGES]
    params = GenerationParams(max_tokens=16, stop=("\n",))
    alone = [llamacpp.generate([p], params)[0] for p in prompts]
    before = llamacpp.evaluated_tokens
    together = llamacpp.generate(prompts, params)
    batched_cost = llamacpp.evaluated_tokens - before
    assert llamacpp.generate(prompts, params) == together  # same batch, same texts
    # a prompt's first token depends on that prompt only; later ones may differ in the last bits
    first = [llamacpp.tokenize(t, bos=False)[:1] for t in together]
    assert first == [llamacpp.tokenize(t, bos=False)[:1] for t in alone]
    prompt_tokens = sum(len(llamacpp.tokenize(p, bos=True)) for p in prompts)
    assert batched_cost < prompt_tokens  # the shared few-shot prefix was evaluated once
