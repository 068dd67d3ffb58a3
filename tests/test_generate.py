"""FRet step 1 on the real packaged LLM and real SciFact passages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.json as pa_json
import pytest

from gecko.corpus import Passage
from gecko.generate import GenerateConfig, generate_batch, parse_query, run_generate, select_passages
from gecko.llm import LLMError
from gecko.llm import load_llm
from gecko.prompts import few_shot_queries

PASSAGE = Passage(
    id="d1",
    doc_id="d1",
    title="Vitamin D and fracture risk in older adults",
    text="In a trial of 2,000 adults over 70, vitamin D supplementation reduced hip fractures by 20% "
    "compared with placebo, but only in participants who were deficient at baseline.",
)


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("   ", "empty"),
        (" Here are three questions: does vitamin D help?", "preamble"),
        (" Sure! vitamin D fractures", "preamble"),
        (" Which of the following statements is true?", "preamble"),
        (" 12345 67890 !!!", "not_text"),
        (" see http://example.com/vitamin-d", "not_text"),
        (" vitamin", "too_short"),
        (" " + " ".join(["vitamin"] * 50), "too_long"),
        (" how does aspirin reduce inflammation?", "copy_of_example"),
        (" Vitamin D and fracture risk in older adults", "copy_of_passage"),
        (" vitamin D supplementation reduced hip fractures by 20% compared with placebo", "copy_of_passage"),
        (" What is the capital of France today?", "off_topic"),
    ],
)
def test_parse_rejects_with_a_reason(raw, reason):
    assert parse_query(raw, "question_answering", PASSAGE, few_shot_queries()) == (None, reason)


def test_parse_accepts_a_real_query_and_strips_quotes():
    query, reason = parse_query(' "does vitamin D prevent hip fractures in the elderly?"', "question_answering", PASSAGE, few_shot_queries())
    assert (query, reason) == ("does vitamin D prevent hip fractures in the elderly?", None)


def test_unknown_task_type_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown task type"):
        GenerateConfig(task_types=("poetry",))


class ConstantLLM:
    """Answers every prompt with the same on-topic query: enough to test the journal's bookkeeping."""

    identity = "constant"

    def __init__(self):
        self.prompts = 0

    def generate(self, prompts, params):
        self.prompts += len(prompts)
        return [" does vitamin D supplementation reduce hip fractures?"] * len(prompts)


class MiscountingLLM(ConstantLLM):
    """Answers one prompt too few, then (as `extra`) gives a non-text answer in place of one."""

    def __init__(self, drop: bool):
        super().__init__()
        self.drop = drop

    def generate(self, prompts, params):
        answers = super().generate(prompts, params)
        return answers[1:] if self.drop else [None, *answers[1:]]


def test_a_backend_miscounting_answers_is_an_error_and_a_non_text_answer_a_rejection():
    with pytest.raises(LLMError, match="answers to"):
        generate_batch([PASSAGE], MiscountingLLM(drop=True), GenerateConfig(per_passage=2))
    entry = generate_batch([PASSAGE], MiscountingLLM(drop=False), GenerateConfig(per_passage=2, max_attempts=1))[PASSAGE.id]
    assert entry["rejected"]["not text"] == 1 and len(entry["records"]) == 1


def test_rerun_with_other_settings_redoes_the_journaled_passages(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "title": PASSAGE.title, "text": PASSAGE.text}) + "\n" for i in range(2)))
    out, llm = tmp_path / "generated.jsonl", ConstantLLM()
    run_generate(corpus, out, llm, GenerateConfig(), progress=False)
    first = llm.prompts
    assert first >= 2
    run_generate(corpus, out, llm, GenerateConfig(), progress=False)
    assert llm.prompts == first  # same settings: everything from the journal
    summary = run_generate(corpus, out, llm, GenerateConfig(temperature=0.5), progress=False)
    assert llm.prompts == 2 * first and summary.passages == 2  # other settings: redone, not reused
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["seed_id"] for r in records) == ["d0", "d1"] and {r["temperature"] for r in records} == {0.5}


def test_a_sample_is_uniform_nested_and_blind_to_corpus_order(tmp_path):
    passages = [Passage(id=f"d{i}", doc_id=f"d{i}", title="", text=PASSAGE.text) for i in range(1000)]
    small, large = select_passages(passages, sample=100), select_passages(passages, sample=300)
    assert len(small) == 100 and {p.id for p in small} <= {p.id for p in large}  # a larger budget reuses the smaller's work
    assert small == sorted(small, key=passages.index)  # corpus order kept
    assert {p.id for p in select_passages(passages[::-1], sample=100)} == {p.id for p in small}
    assert 0 < sum(int(p.id[1:]) < 500 for p in small) < 100 and small != passages[:100]  # drawn from the whole corpus
    assert select_passages(passages, limit=50, sample=300) == passages[:50]  # limit first; a sample of more keeps all
    assert {p.id for p in select_passages(passages, sample=100, seed=1)} != {p.id for p in small}
    with pytest.raises(ValueError, match="sample must be at least 1"):
        select_passages(passages, sample=0)

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": PASSAGE.text}) + "\n" for i in range(5)))
    summary = run_generate(corpus, tmp_path / "generated.jsonl", ConstantLLM(), GenerateConfig(), progress=False, sample=3)
    assert (summary.passages, summary.corpus_passages) == (3, 5) and "passages: 3 of the corpus's 5" in summary.render()


def _slice(shared_data, tmp_path, n):
    import gzip

    path = tmp_path / "corpus.jsonl"
    with gzip.open(shared_data / "scifact" / "corpus.jsonl.gz", "rt") as src, path.open("w") as dst:
        for _, line in zip(range(n), src):
            dst.write(line)
    return path


def test_quality_on_50_scifact_passages(shared_data, tmp_path):
    corpus = _slice(shared_data, tmp_path, 50)
    llm = load_llm("default", cache=tmp_path / "cache.sqlite", n_threads=1)
    out = tmp_path / "generated.jsonl"
    summary = run_generate(corpus, out, llm, GenerateConfig(), progress=False)
    print("\n" + summary.render())
    assert summary.passages == 50
    assert summary.passages_with_query >= 45  # >= 90% of passages yield an accepted query
    records = [json.loads(line) for line in out.read_text().splitlines()]
    examples = {q.lower() for q in few_shot_queries()}
    assert not [r for r in records if r["query"].lower() in examples]
    assert len({r["id"] for r in records}) == len(records)
    assert set(summary.task_mix) <= set(GenerateConfig().task_types) and len(summary.task_mix) >= 4
    table = pa_json.read_json(out)  # the schema is uniform: readable by HF datasets / Arrow
    assert {"id", "seed_id", "task_type", "task", "query", "prompt_id", "model", "raw"} <= set(table.column_names)


def test_kill_9_then_rerun_finishes_exactly_once(shared_data, tmp_path):
    corpus = _slice(shared_data, tmp_path, 20)
    out = tmp_path / "generated.jsonl"
    env = {**os.environ, "GECKO_LLM_CACHE": str(tmp_path / "cache.sqlite"), "GECKO_LLM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gecko.cli", "generate", "--corpus", str(corpus), "--out", str(out), "--batch-size", "2"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / "generated.jsonl.journal"
    deadline = time.time() + 180
    while time.time() < deadline and (not journal.exists() or journal.read_text().count("\n") < 6):
        time.sleep(0.05)
    assert first.poll() is None, "generate finished before it could be killed"
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    kept = journal.read_text()
    kept = kept[: kept.rfind("\n") + 1]  # whole lines: a torn tail is cut on reopening
    assert 6 <= kept.count("\n") < 20, "the kill came mid-run"
    assert not out.exists(), "the final output is only written once every passage is done"

    import sqlite3

    with sqlite3.connect(tmp_path / "cache.sqlite") as db:
        cached_before = db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    rerun = subprocess.run(cmd + ["--summary-json"], env=env, capture_output=True, text=True, check=True)
    summary = json.loads(rerun.stdout)
    with sqlite3.connect(tmp_path / "cache.sqlite") as db:
        cached_after = db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    assert summary["llm_calls"] == cached_after - cached_before  # every call of the rerun is new work
    records = [json.loads(line) for line in out.read_text().splitlines()]
    seeds = [r["seed_id"] for r in records]
    assert len(seeds) == len(set(seeds)) and summary["passages"] == 20
    assert summary["passages_with_query"] == len(set(seeds))
    keys = [json.loads(line)["key"] for line in journal.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 20 and journal.read_text().startswith(kept)  # each passage journaled once
    assert summary["llm_calls"] <= 3 * (20 - kept.count("\n"))  # journaled passages were skipped (max_attempts 3)

    again = subprocess.run(cmd + ["--summary-json"], env=env, capture_output=True, text=True, check=True)
    assert json.loads(again.stdout)["llm_calls"] == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
