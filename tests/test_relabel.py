"""FRet step 2: fusion and negative choice on hand-made scores, input errors, and real runs of
`gecko relabel` (packaged Gemma 3 270M + MiniLM) on a SciFact slice, including kill -9 + rerun."""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.json as pa_json
import pytest
import torch

from gecko.corpus import Passage
from gecko.llm import load_llm
from gecko.llm.base import ContinuationScore, JointRequest, JointScore, LabelScores, score_and_label, score_and_label_by_parts
from gecko.relabel import (
    RelabelConfig,
    RelabelError,
    ScoreConfig,
    build_example,
    fuse,
    is_easy,
    is_lost,
    load_generated,
    naive_score,
    parse_weights,
    ranks,
    run_relabel,
    run_rerank_eval,
    select_negatives,
)
from gecko.relabel.run import GeneratedRecord
from gecko.relabel.scoring import InvalidScore, PairScore, PairScorer
from gecko.retrieve import RetrieveConfig

torch.set_num_threads(1)
TASK = "Given a claim, retrieve documents that support or refute the claim."


# ---------------------------------------------------------------- fusion and negatives


def test_ranks_are_one_based_distinct_and_break_ties():
    assert ranks([0.1, 0.9, 0.5]) == [3, 1, 2]
    assert ranks([1.0, 1.0, 0.0], tiebreak=[2, 1, 3]) == [2, 1, 3]  # tie: the better tiebreak rank first
    assert ranks([1.0, 1.0]) == [1, 2]


def test_rrf_is_the_papers_formula_without_a_constant():
    signals = {"ql": [1, 2, 3], "rc": [3, 1, 2], "retriever": [1, 2, 3]}
    assert fuse(signals, "rrf") == pytest.approx([1 + 1 / 3, 1 / 2 + 1, 1 / 3 + 1 / 2])
    assert fuse(signals, "ql") == [-1, -2, -3]
    assert fuse(signals, "rc") == [-3, -1, -2]
    weighted = fuse(signals, "weighted", {"ql": 2, "retriever": 1})
    assert weighted == pytest.approx([2 + 1, 1 + 1 / 2, 2 / 3 + 1 / 3])
    assert fuse(signals, "weighted", "ql=1,rc=1") == fuse(signals, "rrf")


def test_weights_are_validated():
    assert parse_weights("ql=1, rc=0.5,retriever=2") == {"ql": 1.0, "rc": 0.5, "retriever": 2.0}
    for bad in ("ql", "ql=x", "bm25=1", "ql=0,rc=0"):
        with pytest.raises(ValueError):
            parse_weights(bad)
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse({"ql": [1]}, "borda")


def test_negatives_never_include_the_positive():
    order = [4, 0, 3, 1, 2]  # candidate indices, best first: 4 is the positive
    assert select_negatives(order, "last") == [2]
    assert select_negatives(order, "last", count=2) == [2, 1]
    assert select_negatives(order, "last", exclude={2}) == [1]
    for seed in range(50):
        picked = select_negatives(order, "random", count=2, rng=random.Random(seed))
        assert len(picked) == 2 and 4 not in picked and len(set(picked)) == 2
    assert select_negatives(order, "random", rng=random.Random(3)) == select_negatives(order, "random", rng=random.Random(3))
    assert select_negatives([1, 0], "last", count=5) == [0]
    assert select_negatives([1, 0], "last", exclude={0}) == []


def _entry(rows, seed_rank=1, seed_score=0.9, seed_margin=0.1):
    return {"candidates": rows, "seed_rank": seed_rank, "seed_score": seed_score, "seed_margin": seed_margin}


PASSAGES = {f"p{i}": Passage(f"p{i}", f"p{i}", f"title {i}", f"text of passage {i}") for i in range(5)}
RECORD = GeneratedRecord("g1", "p0", "fact_checking", TASK, "a claim", "gen.jsonl:1")


def _rows(ql, rc):
    # [id, retriever score, ql_sum, ql_tokens, logp_relevant, logp_other]; retriever order p0..p4
    return [[f"p{i}", 0.9 - 0.1 * i, q, 4, r, 0.0] for i, (q, r) in enumerate(zip(ql, rc))]


def test_build_example_picks_p1_by_rrf_and_pN_as_negative():
    rows = _rows(ql=[-9, -3, -5, -7, -8], rc=[0.1, 0.9, 0.5, 0.2, 0.3])  # p1 best on both
    ex, reason, _ = build_example(RECORD, _entry(rows), PASSAGES, RelabelConfig(fusion="rrf"))
    assert reason is None
    assert (ex.positive_id, ex.positive, ex.positive_title) == ("p1", "text of passage 1", "title 1")
    assert ex.positive_changed and ex.positive_retriever_rank == 2
    # fused: p1 1+1, p2 1/2+1/2, p3 1/3+1/4 = p4 1/4+1/3 (tie: the retriever's p3 first), p0 1/5+1/5:
    # p0 is last but it is the seed, so p4
    assert ex.negative_id == "p4" and ex.negative_ids == ["p4"]
    by_id = {c.id: c for c in ex.candidates}
    assert by_id["p1"].rank == 1 and by_id["p1"].ql_rank == 1 and by_id["p1"].rc_rank == 1
    assert by_id["p0"].rc == pytest.approx(0.1) and by_id["p0"].retriever_rank == 1
    assert (by_id["p1"].ql, by_id["p1"].ql_mean) == (-3, -0.75)  # QL summed, and per query token (4), the default teacher
    assert sorted(c.rank for c in ex.candidates) == [1, 2, 3, 4, 5]
    # with the seed allowed as a negative, the lowest fused candidate is taken
    ex2, _, _ = build_example(RECORD, _entry(rows), PASSAGES, RelabelConfig(fusion="rrf", seed_not_negative=False))
    assert ex2.negative_id == "p0"


def test_false_negative_guard_keeps_near_positive_candidates_out_of_the_negatives():
    rows = _rows(ql=[-2, -1, -3, -5, -4], rc=[0] * 5)  # QL order p1 p0 p2 p4 p3; retriever 0.9 .. 0.5
    plain, _, _ = build_example(RECORD, _entry(rows), PASSAGES, RelabelConfig(fusion="ql"))
    assert plain.negative_id == "p3" and plain.likely_false_negatives == []
    # above 0.7 x the positive's 0.8: p2 (0.7) and p3 (0.6); the seed p0 is excluded anyway
    guarded, _, _ = build_example(RECORD, _entry(rows), PASSAGES, RelabelConfig(fusion="ql", false_negative_ratio=0.7))
    assert guarded.negative_id == "p4" and guarded.likely_false_negatives == ["p2", "p3"]
    teacher, _, _ = build_example(RECORD, _entry(rows), PASSAGES, RelabelConfig(fusion="ql", false_negative_ql_margin=2.5))
    assert teacher.likely_false_negatives == ["p2"] and teacher.negative_id == "p3"
    none, reason, _ = build_example(RECORD, _entry(rows), PASSAGES, RelabelConfig(fusion="ql", false_negative_ratio=0.5))
    assert none is None and reason == "no_negative"
    with pytest.raises(ValueError, match="false_negative_ratio"):
        RelabelConfig(false_negative_ratio=1.5)


def test_default_fusion_is_rrf_over_ql_and_the_retriever():
    config = RelabelConfig()
    assert (config.fusion, parse_weights(config.weights)) == ("weighted", {"ql": 1.0, "retriever": 1.0})
    rows = _rows(ql=[-5, -1, -2, -3, -4], rc=[0.9, 0.1, 0.5, 0.2, 0.3])
    # p1: 1/1 + 1/2 = 1.5 beats p0: 1/5 + 1/1 = 1.2 and p2: 1/2 + 1/3 = 0.83; RC is ignored
    ex, _, _ = build_example(RECORD, _entry(rows), PASSAGES, config)
    assert ex.positive_id == "p1" and ex.fusion == "weighted"
    assert {c.id: c.rc_rank for c in ex.candidates}["p0"] == 1  # RC is still computed and stored


def test_seed_positive_ablation_keeps_the_seed_even_when_not_retrieved():
    rows = _rows(ql=[-9, -3, -5, -7, -8], rc=[0.1, 0.9, 0.5, 0.2, 0.3])  # the LLM prefers p1 over the seed p0
    ex, _, _ = build_example(RECORD, _entry(rows), PASSAGES, RelabelConfig(fusion="rrf", positive="seed"))
    assert (ex.positive_id, ex.positive_changed, ex.positive_retriever_rank) == ("p0", False, 1)
    assert ex.negative_id not in ("p0", "p1")  # neither the seed nor the LLM's top pick is a negative
    unretrieved = GeneratedRecord("g2", "p4", "fact_checking", TASK, "a claim", "gen.jsonl:2")
    ex, _, _ = build_example(unretrieved, _entry(rows[:4], seed_rank=None), PASSAGES, RelabelConfig(positive="seed"))
    assert (ex.positive_id, ex.positive, ex.positive_retriever_rank) == ("p4", "text of passage 4", None)
    with pytest.raises(ValueError, match="unknown positive"):
        RelabelConfig(positive="best")


def test_fusion_options_and_several_negatives():
    rows = _rows(ql=[-1, -2, -3, -4, -5], rc=[0.0, 0.1, 0.2, 0.3, 0.4])  # QL and RC disagree fully
    ql, _, _ = build_example(RECORD, _entry(rows), PASSAGES, RelabelConfig(fusion="ql"))
    rc, _, _ = build_example(RECORD, _entry(rows), PASSAGES, RelabelConfig(fusion="rc"))
    assert (ql.positive_id, ql.positive_changed) == ("p0", False)
    assert rc.positive_id == "p4" and rc.negative_id == "p1"  # p0 (the seed) is skipped as negative
    ret, _, _ = build_example(RECORD, _entry(rows), PASSAGES, RelabelConfig(fusion="weighted", weights="retriever=1"))
    assert ret.positive_id == "p0"
    many, _, _ = build_example(RECORD, _entry(rows), PASSAGES, RelabelConfig(fusion="ql", n_negatives=3))
    assert many.negative_ids == ["p4", "p3", "p2"] and "p0" not in many.negative_ids
    assert many.negative == [PASSAGES[i].text for i in many.negative_ids] and many.negative_title[0] == "title 4"
    rnd, _, _ = build_example(RECORD, _entry(rows), PASSAGES, RelabelConfig(fusion="ql", negative="random", n_negatives=2))
    assert "p0" not in rnd.negative_ids and len(rnd.negative_ids) == 2


def test_duplicate_text_of_the_positive_is_never_a_negative():
    passages = dict(PASSAGES)
    passages["p4"] = Passage("p4", "p4", "copy", passages["p1"].text.upper())
    rows = _rows(ql=[-9, -1, -5, -7, -8], rc=[0.9, 0.8, 0.5, 0.2, 0.1])
    ex, _, _ = build_example(RECORD, _entry(rows), passages, RelabelConfig(fusion="ql"))
    assert ex.positive_id == "p1" and ex.negative_id == "p3"


def test_easy_examples_are_marked_by_seed_rank_and_margin():
    rows = _rows(ql=[-1, -2, -3, -4, -5], rc=[0.4, 0.3, 0.2, 0.1, 0.0])
    ex, _, _ = build_example(RECORD, _entry(rows, seed_rank=1, seed_margin=0.2), PASSAGES, RelabelConfig())
    assert ex.positive_id == "p0" and is_easy(ex, 0.1) and not is_easy(ex, 0.3)
    hard, _, _ = build_example(RECORD, _entry(rows, seed_rank=3, seed_margin=-0.1), PASSAGES, RelabelConfig())
    assert not is_easy(hard, -1.0)


def test_queries_whose_seed_the_retriever_lost_are_marked_by_seed_rank():
    rows = _rows(ql=[-1, -2, -3, -4, -5], rc=[0.4, 0.3, 0.2, 0.1, 0.0])
    near, _, _ = build_example(RECORD, _entry(rows, seed_rank=3, seed_margin=-0.1), PASSAGES, RelabelConfig())
    assert not is_lost(near, 3) and is_lost(near, 2)
    gone, _, _ = build_example(RECORD, _entry(rows, seed_rank=None, seed_margin=-0.3), PASSAGES, RelabelConfig())
    assert is_lost(gone, 20)


def test_config_rejects_fusions_the_prompt_cannot_give():
    with pytest.raises(ValueError, match="needs"):
        RelabelConfig(fusion="rrf", score=ScoreConfig(prompt_style="ql"))
    with pytest.raises(ValueError, match="unknown fusion"):
        RelabelConfig(fusion="max")
    with pytest.raises(ValueError, match="top_n"):
        RelabelConfig(top_n=1)
    RelabelConfig(fusion="ql", score=ScoreConfig(prompt_style="ql"))


# ---------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"id": "a", "seed_id": "s", "task": "t", "query": "q"}\nnot json\n', r"gen\.jsonl:2: invalid JSON"),
        ('{"id": "a", "seed_id": "s", "task": "t"}\n', r"gen\.jsonl:1: missing or empty field 'query'"),
        ('{"id": "a", "seed_id": "s", "task": "t", "query": "  "}\n', r"gen\.jsonl:1: missing or empty field 'query'"),
        ('[1, 2]\n', r"gen\.jsonl:1: expected a JSON object"),
        ('{"id": "a", "seed_id": "s", "task": "t", "query": "q"}\n\n{"id": "a", "seed_id": "s", "task": "t", "query": "q"}\n',
         r"gen\.jsonl:3: duplicate id 'a' \(first at .*gen\.jsonl:1\)"),
        ("", r"gen\.jsonl: no records"),
    ],
)
def test_bad_generated_file_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "gen.jsonl"
    path.write_text(content)
    with pytest.raises(RelabelError, match=message):
        load_generated(path)


def test_unknown_seed_and_bad_output_are_errors_before_any_llm_work(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "d1", "title": "", "text": "some text"}) + "\n")
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"id": "a", "seed_id": "d1", "task": TASK, "query": "q"}) + "\n"
                   + json.dumps({"id": "b", "seed_id": "nope", "task": TASK, "query": "q"}) + "\n")
    with pytest.raises(RelabelError, match=r"gen\.jsonl:2: seed_id 'nope' is not a passage of the corpus"):
        run_relabel(gen, corpus, tmp_path / "out.jsonl", llm=None, progress=False)
    with pytest.raises(RelabelError, match="must end in .jsonl or .parquet"):
        run_relabel(gen, corpus, tmp_path / "out.csv", llm=None, progress=False)
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.journal").exists()


def test_cli_reports_bad_input_with_exit_code_2(tmp_path):
    gen = tmp_path / "gen.jsonl"
    gen.write_text("{broken\n")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "d1", "text": "x"}) + "\n")
    run = subprocess.run([sys.executable, "-m", "gecko.cli", "relabel", "--generated", str(gen), "--corpus", str(corpus),
                          "--out", str(tmp_path / "o.jsonl")], capture_output=True, text=True)
    assert run.returncode == 2 and f"{gen}:1: invalid JSON" in run.stderr
    run = subprocess.run([sys.executable, "-m", "gecko.cli", "relabel", "--generated", str(gen), "--corpus", str(corpus),
                          "--out", str(tmp_path / "o.jsonl"), "--fusion", "weighted", "--weights", "bm25=1"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "unknown signal" in run.stderr


# ---------------------------------------------------------------- the joint scoring protocol


class CountingLLM:
    """A deterministic stand-in backend: QL from word overlap, labels from a hash; counts calls."""

    identity = "fake:overlap"

    def __init__(self):
        self.score_calls = self.label_calls = 0

    def score(self, prefix, continuations):
        self.score_calls += 1
        passage = set(prefix.rsplit("Passage:", 1)[-1].lower().split())
        out = []
        for c in continuations:
            words = c.lower().split()
            out.append(ContinuationScore(words, [0.0 if w in passage else -2.0 for w in words]))
        return out

    def label_logprobs(self, prompt, labels):
        self.label_calls += 1
        return LabelScores({label: -((hash((prompt, label)) % 1000) / 100.0) for label in labels})


def test_score_and_label_falls_back_to_score_plus_labels_and_is_cached(tmp_path):
    from gecko.llm.cache import CachedLLM, LLMCache

    fake = CountingLLM()
    reqs = [JointRequest("Passage: cats purr\nQuery:", " do cats purr", "\nRelevant:", (" Yes", " No")),
            JointRequest("Passage: cats purr\nQuery:", " dogs bark", "\nRelevant:", (" Yes", " No"))]
    direct = score_and_label(fake, "PREFIX\n", reqs)
    assert fake.score_calls == 2 and fake.label_calls == 2
    assert direct[0].continuation.total == -2.0 and direct[1].continuation.total == -4.0  # "do", "dogs", "bark" unseen
    cached = CachedLLM(CountingLLM(), LLMCache(tmp_path / "c.sqlite"))
    assert score_and_label(cached, "PREFIX\n", reqs) == direct
    assert score_and_label(cached, "PREFIX\n", reqs) == direct
    assert cached.backend_calls == 2 and cached.cache_hits == 2


def test_joint_scores_on_llamacpp_equal_separate_prompts_with_fewer_tokens(llamacpp):
    """One pass per candidate after a shared prefix gives the naive way's numbers.

    Not bit for bit: llama.cpp's kernels depend on which tokens share a batch, and the joint
    pass batches the query with the question, not with the passage's last tokens. Measured on
    12 SciFact pairs (3 abstracts x 4 queries): at most 0.017 nat per query token for QL and
    0.063 for the RC log-odds.
    """
    scorer_cfg = ScoreConfig(max_passage_words=60)
    passage = Passage("d", "d", "Vitamin D", "Vitamin D supplementation reduced hip fractures by 20% in adults over 70 "
                      "who were deficient at baseline, but had no effect in those with normal levels.")
    queries = ["does vitamin D prevent fractures?", "aspirin reduces the risk of stroke"]
    llamacpp.reset()
    naive_before = llamacpp.evaluated_tokens
    naive = [naive_score(llamacpp, passage, q, scorer_cfg) for q in queries]
    naive_tokens = llamacpp.evaluated_tokens - naive_before
    scorer = PairScorer(llamacpp, scorer_cfg)
    scorer.score_passage(passage, ["warm-up: the prefix KV is computed once for all candidates"])
    before = llamacpp.evaluated_tokens
    joint = scorer.score_passage(passage, queries)
    joint_tokens = llamacpp.evaluated_tokens - before
    for a, b in zip(joint, naive):
        assert a.ql_tokens == b.ql_tokens
        assert abs(a.ql_sum - b.ql_sum) <= 0.05 * a.ql_tokens
        assert abs(a.rc() - b.rc()) <= 0.15
    assert joint[0].ql_sum > joint[1].ql_sum  # the relevant query is the likelier one
    assert joint_tokens * 4 < naive_tokens, (joint_tokens, naive_tokens)


class BrokenLLM:
    """score_and_label answers with NaN QL for passages that contain `word`, or (by `mode`)
    without a label, or one score short."""

    identity = "fake:broken"

    def __init__(self, mode: str = "nan", word: str = "poison"):
        self.mode, self.word = mode, word

    def score_and_label(self, prefix, requests):
        out = []
        for r in requests:
            value = float("nan") if self.mode == "nan" and self.word in r.context else -1.0
            labels = {} if self.mode == "no labels" else {label: -0.5 for label in r.labels}
            out.append(JointScore(ContinuationScore(["x", "y"], [value, -1.0]), LabelScores(labels)))
        return out[:-1] if self.mode == "short" else out


@pytest.mark.parametrize("mode, message", [("no labels", r"no log-probability for label\(s\) \[' Yes', ' No'\]"),
                                           ("short", r"2 scores for 3 \(query, passage\) pairs")])
def test_a_backend_missing_a_label_or_a_score_is_a_named_error(mode, message):
    passage = Passage("d", "d", "", "cats purr")
    with pytest.raises(InvalidScore, match=message) as info:
        PairScorer(BrokenLLM(mode)).score_passage(passage, ["a", "b", "c"])
    assert "fake:broken" in str(info.value)


def _nan_inputs(tmp_path: Path) -> tuple[Path, Path]:
    texts = ["cats purr when they are content", "poison ivy causes a rash", "dogs bark at strangers",
             "vitamin d and bone health", "the stock market fell today", "rain forests hold many species"]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(texts)))
    generated = tmp_path / "generated.jsonl"
    generated.write_text("".join(json.dumps({"id": f"q{i}", "seed_id": f"d{i}", "task": TASK, "query": q}) + "\n"
                                 for i, q in enumerate(["why do cats purr", "what does poison ivy do", "vitamin d bones"])))
    return generated, corpus


def test_nan_scores_never_reach_a_file_an_error_or_a_counted_skip(tmp_path):
    generated, corpus = _nan_inputs(tmp_path)
    retrieve = RetrieveConfig(cache_dir=str(tmp_path / "emb"))
    out = tmp_path / "strict.jsonl"
    with pytest.raises(InvalidScore, match=r"fake:broken gave a score that is not finite \(query 'q\d', passage 'd1': QL nan\)"):
        run_relabel(generated, corpus, out, BrokenLLM(), RelabelConfig(top_n=6, retrieve=retrieve), progress=False)
    assert not out.exists()
    journal = tmp_path / "strict.jsonl.journal"
    assert "NaN" not in (journal.read_text() if journal.exists() else "")

    def strict_json(text: str) -> object:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} written"))

    out = tmp_path / "lenient.jsonl"  # top-3 from 6 passages: the poison passage is not every query's candidate
    summary = run_relabel(generated, corpus, out, BrokenLLM(), RelabelConfig(top_n=3, lenient=True, retrieve=retrieve), progress=False)
    rows = [strict_json(line) for line in out.read_text().splitlines()]
    written = strict_json((tmp_path / "lenient.jsonl.summary.json").read_text())
    assert summary.skipped["invalid_llm_score"] >= 1 and written["skipped"] == dict(summary.skipped)
    assert summary.examples == len(rows) == 3 - summary.skipped["invalid_llm_score"]
    assert "NaN" not in (tmp_path / "lenient.jsonl.journal").read_text()
    assert all("d1" not in [c["id"] for c in r["candidates"]] for r in rows)


# ---------------------------------------------------------------- rerank-eval on a BEIR folder


def _quora_like(root: Path) -> Path:
    """Queries that are corpus documents (same id), each judged against its duplicate; one qrels line
    names a document the corpus lacks."""
    pairs = [("How do airplanes stay in the air?", "What keeps a plane flying in the sky?"),
             ("Why do cats purr?", "What is the reason cats make a purring sound?"),
             ("How do I learn Python quickly?", "What is the fastest way to learn to program in Python?"),
             ("Why is the sky blue during the day?", "What makes the daytime sky appear blue?")]
    others = ["How do I bake sourdough bread at home?", "What is the capital city of Australia?",
              "How do vaccines train the immune system?"]
    docs = [(f"{i}a", a) for i, (a, _) in enumerate(pairs)] + [(f"{i}b", b) for i, (_, b) in enumerate(pairs)]
    docs += [(f"x{i}", t) for i, t in enumerate(others)]
    root.mkdir()
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n" for i, t in docs))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": f"{i}a", "text": a}) + "\n" for i, (a, _) in enumerate(pairs)))
    qrels = [(f"{i}a", f"{i}b") for i in range(len(pairs))] + [("1a", "gone")]
    (root / "qrels.test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in qrels))
    return root


def test_rerank_eval_ranks_a_beir_folder_by_the_rules_of_eval(tmp_path, capsys):
    from gecko.evaluate import EvalError, evaluate

    folder = _quora_like(tmp_path / "dupes")
    retrieve = RetrieveConfig(query_format="{query}", cache_dir=str(tmp_path / "emb"))
    auto = run_rerank_eval(folder, CountingLLM(), top_n=10, retrieve=retrieve, progress=False)
    err = capsys.readouterr().err
    assert "gecko rerank-eval: task dupes: 4 of 4 query ids are also corpus ids" in err and "left out" in err
    assert "1 qrels line(s) name documents absent from the corpus (first: 'gone' (6))" in err
    protocol = auto.config["protocol"]
    assert protocol["ignore_identical_ids"] is True and protocol["qrels_absent_from_corpus"]["count"] == 1
    assert auto.pairs == 4 * 10  # each query still has 10 candidates, its own document not among them
    assert auto.precision_at_1["retriever"] == 1.0
    # the retriever's order is `gecko eval`'s ranking of the same folder (absent document in the ideal ranking)
    scored = evaluate("default", f"dupes={folder}", prompts=False, backend="builtin", cache_dir=tmp_path / "emb", progress=False)
    assert auto.ndcg_at_10["retriever"] == pytest.approx(scored.task("dupes").main_score(384), abs=1e-6)
    assert auto.ndcg_at_10["retriever"] < 1.0
    kept = run_rerank_eval(folder, CountingLLM(), top_n=10, retrieve=retrieve, progress=False, ignore_identical_ids=False)
    assert kept.config["protocol"]["ignore_identical_ids"] is False
    assert kept.precision_at_1["retriever"] == 0.0  # each query's own document comes first
    with pytest.raises(EvalError, match=r"qrels.test.tsv:6: corpus id 'gone' is not in the corpus"):
        run_rerank_eval(folder, CountingLLM(), top_n=10, retrieve=retrieve, progress=False, strict=True)
    with pytest.raises(InvalidScore, match=r"fake:broken gave a score that is not finite \(query '0a', document '\w+': QL nan\)"):
        run_rerank_eval(folder, BrokenLLM(word=""), top_n=10, retrieve=retrieve, progress=False)


# ---------------------------------------------------------------- real runs on a SciFact slice


def make_slice(shared_data: Path, directory: Path, n_queries: int = 6, n_docs: int = 30) -> tuple[Path, Path]:
    """corpus.jsonl: the seed documents of the first `n_queries` test claims plus the first corpus
    documents up to `n_docs`; generated.jsonl: those claims as fact-checking queries."""
    root = shared_data / "scifact"
    queries = {}
    with gzip.open(root / "queries.jsonl.gz", "rt") as handle:
        for line in handle:
            d = json.loads(line)
            queries[d["_id"]] = d["text"]
    chosen: dict[str, str] = {}
    with open(root / "qrels.test.tsv") as handle:
        for row in csv.reader(handle, delimiter="\t"):
            if row[0] != "query-id" and row[0] not in chosen and len(chosen) < n_queries:
                chosen[row[0]] = row[1]
    docs = {}
    with gzip.open(root / "corpus.jsonl.gz", "rt") as handle:
        for line in handle:
            d = json.loads(line)
            docs[d["_id"]] = d
    keep = list(dict.fromkeys(chosen.values()))
    keep += [d for d in docs if d not in keep][: n_docs - len(keep)]
    directory.mkdir(parents=True, exist_ok=True)
    corpus, generated = directory / "corpus.jsonl", directory / "generated.jsonl"
    corpus.write_text("".join(json.dumps(docs[d]) + "\n" for d in keep))
    generated.write_text("".join(
        json.dumps({"id": f"claim-{q}", "seed_id": d, "task_type": "fact_checking", "task": TASK, "query": queries[q]}) + "\n"
        for q, d in chosen.items()
    ))
    return generated, corpus


FAST = ScoreConfig(max_passage_words=40)  # short passages keep the real-LLM tests quick


def test_relabel_end_to_end_on_the_real_llm(shared_data, tmp_path):
    generated, corpus = make_slice(shared_data, tmp_path)
    llm = load_llm("default", cache=tmp_path / "cache.sqlite", n_threads=1)
    config = RelabelConfig(top_n=4, score=FAST, retrieve=RetrieveConfig(cache_dir=str(tmp_path / "emb")))
    out = tmp_path / "relabeled.jsonl"
    summary = run_relabel(generated, corpus, out, llm, config, progress=False)
    print("\n" + summary.render())
    assert summary.queries == 6 and summary.examples == 6 and summary.pairs_scored == 24
    assert sum(summary.seed_rank.values()) == 6 and set(summary.seed_rank) == {"1", "2-5", "6-10", "11-N", ">N"}
    assert summary.tokens_evaluated and summary.corpus_encoded == 30
    assert {"llm_s", "encode_corpus_s", "index_s", "search_s", "write_s"} <= set(summary.times)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [json.loads(line)["id"] for line in generated.read_text().splitlines()]
    corpus_text = {json.loads(line)["_id"]: json.loads(line)["text"] for line in corpus.read_text().splitlines()}
    for r in records:
        assert r["positive_id"] != r["negative_id"] and r["negative_id"] != r["seed_id"]
        assert r["positive"] == corpus_text[r["positive_id"]] and r["negative"] == corpus_text[r["negative_id"]]
        assert r["positive_changed"] == (r["positive_id"] != r["seed_id"])
        assert len(r["candidates"]) == 4 and sorted(c["rank"] for c in r["candidates"]) == [1, 2, 3, 4]
        top = min(r["candidates"], key=lambda c: c["rank"])
        assert top["id"] == r["positive_id"] and all(c["ql"] is not None and c["rc"] is not None for c in r["candidates"])
    # what `gecko train` reads, through HF datasets (and Arrow)
    import datasets

    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert {"task", "query", "positive", "negative", "positive_id", "negative_id", "seed_id", "positive_changed",
            "candidates", "seed_rank", "seed_margin"} <= set(ds.column_names)
    assert pa_json.read_json(out).num_rows == 6

    # a rerun, and a rerun with another fusion / negative rule / output format: no LLM call
    calls = llm.backend_calls
    again = run_relabel(generated, corpus, tmp_path / "ql.parquet", llm,
                        RelabelConfig(top_n=4, score=FAST, fusion="ql", negative="random", drop_easy_margin=-1.0, max_seed_rank=1,
                                      retrieve=RetrieveConfig(cache_dir=str(tmp_path / "emb"))), progress=False)
    assert llm.backend_calls == calls and again.corpus_encoded == 0
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "ql.parquet").num_rows == again.examples == 6 - again.skipped["easy"] - again.skipped["lost seed"]


def test_kill_9_then_rerun_finishes_exactly_once(shared_data, tmp_path):
    generated, corpus = make_slice(shared_data, tmp_path)
    out = tmp_path / "relabeled.jsonl"
    env = {**os.environ, "GECKO_LLM_CACHE": str(tmp_path / "cache.sqlite"), "GECKO_LLM_THREADS": "1",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gecko.cli", "relabel", "--generated", str(generated), "--corpus", str(corpus),
           "--out", str(out), "--top-n", "4", "--max-passage-words", "40", "--query-chunk", "3"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / "relabeled.jsonl.journal"
    deadline = time.time() + 240
    while time.time() < deadline and (not journal.exists() or journal.read_text().count("\n") < 2):
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert not out.exists(), "the output is written only once every query is done"
    done_before = journal.read_text().count("\n")
    assert 2 <= done_before < 6

    with sqlite3.connect(tmp_path / "cache.sqlite") as db:
        cached_before = db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    rerun = subprocess.run(cmd + ["--summary-json"], env=env, capture_output=True, text=True, check=True)
    summary = json.loads(rerun.stdout)
    with sqlite3.connect(tmp_path / "cache.sqlite") as db:
        cached_after = db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    assert summary["llm_calls"] == cached_after - cached_before  # no LLM call was made twice
    assert summary["pairs_scored"] <= 4 * (6 - done_before)  # journaled queries were not scored again
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6 and len({r["id"] for r in records}) == 6 and summary["examples"] == 6
    entries = [json.loads(line)["key"] for line in journal.read_text().splitlines()]
    assert len(entries) == len(set(entries)) == 6  # each query journaled exactly once

    again = subprocess.run(cmd + ["--summary-json"], env=env, capture_output=True, text=True, check=True)
    assert json.loads(again.stdout)["llm_calls"] == 0 and json.loads(again.stdout)["pairs_scored"] == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
