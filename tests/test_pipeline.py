"""`gecko run` / `run_pipeline`: config validation and overrides, then one real tiny run (packaged Gemma
3 270M and MiniLM, 6 passages, eval on the bundled mini SciFact) that is killed with kill -9 in
generate, resumed, rerun (everything skipped, no LLM call), rerun with a changed train key and with
a deleted output."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from gecko.cli import main
from gecko.corpus import load_beir, load_corpus
from gecko.demo import demo_config
from gecko.generate import PASSAGE_SAMPLE
from gecko.llm import CachedLLM, LLMCache, open_backend
from gecko.pipeline import STAGES, ConfigError, PipelineError, load_config, read_manifest, run_pipeline, start_in_background

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "gecko" / "data" / "sample"
TINY = ["generate.limit=6", "generate.batch_size=1", "relabel.top_n=4", "relabel.score.max_passage_words=40",
        "train.steps=2", "train.batch_size=4", "train.logging_steps=1", "eval.backend=builtin", "train.holdout=0.4"]


# ---------------------------------------------------------------- config


def test_bundled_demo_data_is_a_valid_beir_task_that_holds_the_sample():
    mini = load_beir(SAMPLE / "scifact-mini", "test")
    sample, _ = load_corpus(SAMPLE / "scifact-sample.jsonl")
    assert len(mini.queries) == 50 and len(mini.corpus) == 300
    assert {p.id for p in sample} <= {p.id for p in mini.corpus}  # generate's passages are in the retrieval pool
    assert sum(f.stat().st_size for f in (SAMPLE / "scifact-mini").rglob("*") if f.is_file()) < 1_000_000
    config = load_config(demo_config())
    assert Path(config.corpus) == SAMPLE / "scifact-mini" / "corpus.jsonl"  # relative to the config file
    assert config.eval.tasks[0].resolve().prompt == "fact checking"


def test_unknown_keys_are_named_with_their_path_and_line(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"run_dir: out\ncorpus: {SAMPLE / 'scifact-sample.jsonl'}\nrelabel:\n  top_n: 5\n  fusoin: rrf\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:5: relabel\.fusoin: unknown key; did you mean 'fusion'"):
        load_config(cfg)
    with pytest.raises(ConfigError, match=r"command line: relabel\.score\.max_pasage_words: unknown key; did you mean 'max_passage_words'"):
        load_config(demo_config(), ["relabel.score.max_pasage_words=40"])
    with pytest.raises(ConfigError, match=r"train\.data\.0\.wieght: unknown key"):
        load_config(demo_config(), ["train.data=[{path: x, wieght: 2}]"])
    with pytest.raises(ConfigError, match=r"^command line: evaluate: unknown key"):
        load_config(demo_config(), ["evaluate.dims=[64]"])


@pytest.mark.parametrize("override, message", [
    ("train.epochs=abc", r"train\.epochs: Input should be a valid number"),
    ("relabel.top_n=1", r"relabel\.top_n: top_n must be at least 2"),
    ("relabel.retrieve.index=hnsw", r"relabel\.retrieve\.index: unknown index 'hnsw'"),
    ("generate.task_types=[poetry]", r"generate\.task_types: unknown task type"),
    ("generate.limit=0", r"generate\.limit: limit must be at least 1"),
    ("generate.sample=0", r"generate\.sample: sample must be at least 1"),
    ("train.batch_size=1", r"train\.batch_size: batch_size must be at least 2"),
    ("eval.dims=[384, big]", r"eval\.dims\.1: Input should be a valid integer"),
    ("corpus=missing.jsonl", r"corpus: missing\.jsonl: no such file"),
    ("train.data=[missing:0.5]", r"train\.data\.0: missing: no such file"),
    ("eval.tasks.scifact=/nowhere", r"eval\.tasks\.scifact: .*no such file"),
    ("corpus.path=x", r"corpus is a value, not a section"),
    ("top_n", r"expected KEY=VALUE"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(demo_config(), [override])


def test_overrides_are_yaml_values_on_dotted_paths_and_the_config_round_trips(tmp_path):
    config = load_config(demo_config(), ["relabel.top_n=7", "train.epochs=2", "relabel.score.max_passage_words=30",
                                         "eval.dims=[384, 64]", "generate.limit=null", "relabel.drop_easy_margin=0.1",
                                         f"train.data=[stsb={SAMPLE / 'scifact-mini'}:0.5]", "run_dir=elsewhere"])
    assert config.relabel.config.top_n == 7 and config.relabel.config.score.max_passage_words == 30
    assert config.train.settings["epochs"] == 2.0 and config.eval.dims == (384, 64)
    assert config.generate.limit is None and config.relabel.config.drop_easy_margin == 0.1
    assert config.generate.sample == PASSAGE_SAMPLE  # gecko run's passage budget unless the file or command line says
    assert config.train.data[0].name == "stsb" and config.train.data[0].weight == 0.5
    assert config.run_dir == "elsewhere"  # run_dir (and command-line paths) stay relative to the current directory
    assert config.relabel.config.fusion  # untouched keys keep the file's value or the stage's default
    again = load_config(config.to_dict())
    assert (again.generate, again.relabel, again.train, again.eval) == (config.generate, config.relabel, config.train, config.eval)


def test_cli_reports_a_bad_key_with_exit_code_2(capsys):
    assert main(["run", str(demo_config()), "relabel.fusoin=rrf"]) == 2
    assert "relabel.fusoin: unknown key" in capsys.readouterr().err
    assert main(["run", str(demo_config()), "relabel.top_n=3", "--show-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["relabel"]["top_n"] == 3


def test_a_second_start_is_refused_while_the_first_holds_the_folder(tmp_path, monkeypatch):
    """The background child inherits the lock its starter took: no moment when a second start gets in."""
    import fcntl

    monkeypatch.setenv("GECKO_LLM_CACHE", str(tmp_path / "cache.sqlite"))
    run_dir = tmp_path / "run"
    config = load_config(demo_config(), [f"run_dir={run_dir}"])
    argv = [str(demo_config()), f"run_dir={run_dir}", "--no-progress"]
    pid, _ = start_in_background(config, argv)
    os.kill(pid, signal.SIGSTOP)  # long before it could reach its own lock
    try:
        with pytest.raises(PipelineError, match="another gecko run is using this folder"):
            start_in_background(config, argv)
        with pytest.raises(PipelineError, match="another gecko run is using this folder"):
            run_pipeline(config, progress=False)
        assert main(["run", *argv, "--background"]) == 2
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    with (run_dir / ".lock").open("a") as handle:  # released with its process
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ---------------------------------------------------------------- a real tiny run


def _env(cache: Path) -> dict:
    env = dict(os.environ, GECKO_LLM_CACHE=str(cache), GECKO_LLM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cache_rows(cache: Path) -> int:
    with sqlite3.connect(cache) as db:
        return db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").is_dir() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A `gecko run --background` (its own process, outliving the command that started it) killed
    with kill -9 after generate journaled its first passages."""
    root = tmp_path_factory.mktemp("pipeline")
    run_dir, cache = root / "run", root / "llm-cache.sqlite"
    cmd = [sys.executable, "-m", "gecko.cli", "run", str(demo_config()), f"run_dir={run_dir}", *TINY, "--no-progress", "--background"]
    started = subprocess.run(cmd, env=_env(cache), capture_output=True, text=True, timeout=120)
    assert started.returncode == 0 and "in the background" in started.stdout, started.stderr
    pid = int((run_dir / "run.pid").read_text())
    journal = run_dir / "generate" / "generated.jsonl.journal"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and (not journal.exists() or journal.read_text().count("\n") < 2):
            assert _alive(pid), "gecko run ended before it could be killed:\n" + (run_dir / "run.log").read_text()[-2000:]
            time.sleep(0.05)
    finally:
        os.kill(pid, signal.SIGKILL)
        while _alive(pid) and time.monotonic() < deadline + 30:
            time.sleep(0.05)
    assert "gecko run" in (run_dir / "run.log").read_text()
    return run_dir, cache, journal.read_text().count("\n")


@pytest.fixture(scope="module")
def resumed(killed_run):
    run_dir, cache, journaled = killed_run
    assert read_manifest(run_dir / "generate" / "manifest.json")["status"] == "running"
    assert not (run_dir / "generate" / "generated.jsonl").exists() and 2 <= journaled < 6
    llm = CachedLLM(open_backend("default", n_threads=1), LLMCache(cache))  # what the killed `gecko run` used
    rows_before = _cache_rows(cache)
    config = load_config(demo_config(), [f"run_dir={run_dir}", *TINY])
    result = run_pipeline(config, llm=llm, progress=False)
    return config, llm, result, rows_before


def test_interrupted_run_resumes_and_completes_without_repeating_llm_work(killed_run, resumed):
    run_dir, cache, journaled = killed_run
    config, llm, result, rows_before = resumed
    assert result.status == {"generate": "resumed", "relabel": "ran", "train": "ran", "eval": "ran"}
    gen = read_manifest(run_dir / "generate" / "manifest.json")
    assert gen["status"] == "done" and gen["attempt"] == 2 and gen["counts"]["passages"] == 6
    keys = [json.loads(line)["key"] for line in (run_dir / "generate" / "generated.jsonl.journal").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 6  # every passage journaled exactly once
    new_calls = gen["summary"]["llm_calls"] + read_manifest(run_dir / "relabel" / "manifest.json")["summary"]["llm_calls"]
    assert new_calls == _cache_rows(cache) - rows_before  # every LLM call of the resumed run was new work
    assert gen["summary"]["llm_calls"] <= 3 * (6 - journaled)  # journaled passages were not generated again (max_attempts 3)


def test_the_run_leaves_manifests_examples_a_model_and_a_report(resumed):
    config, llm, result, _ = resumed
    run_dir = result.run_dir
    for stage in STAGES:
        m = read_manifest(run_dir / stage / "manifest.json")
        assert m["status"] == "done" and m["wall_s"] > 0 and m["finished"] and m["counts"]
        assert all(len(i["sha256"]) == 64 for i in m["inputs"].values())
        assert all((run_dir / o["path"]).exists() for o in m["outputs"].values())
    rel = read_manifest(run_dir / "relabel" / "manifest.json")
    assert rel["config"]["relabel"]["top_n"] == 4 and rel["counts"]["examples"] == len(
        (run_dir / "relabel" / "relabeled.jsonl").read_text().splitlines())
    assert (run_dir / "train" / "model" / "training.json").is_file()
    assert read_manifest(run_dir / "train" / "manifest.json")["counts"]["steps"] == 2
    rows = [r for r in read_manifest(run_dir / "eval" / "manifest.json")["summary"]["before_after"] if r["task"] == "scifact-mini"]
    assert [r["dim"] for r in rows] == [384, 256, 128, 64]
    assert all(r["before"] is not None and r["after"] is not None for r in rows)
    assert rows[0]["before"] > 50  # the packaged MiniLM on the mini SciFact: a sane nDCG@10 ×100
    report = result.report.read_text()
    for needle in ("positive changed", "task-type mix", "before (base)", "| scifact-mini | ndcg_at_10 | 64 |",
                   "as MTEB scores it", "Label-free check", "| holdout | ndcg_at_10 | 384 |", "overstate quality",
                   "Both models with the same prompts"):
        assert needle in report, needle
    # held-out queries: never trained on, scored as a retrieval task before and after
    held = (run_dir / "train" / "holdout" / "queries.jsonl").read_text().splitlines()
    trained_ids = {json.loads(line)["id"] for line in (run_dir / "train" / "train.jsonl").read_text().splitlines()}
    assert held and not {json.loads(line)["_id"] for line in held} & trained_ids
    assert read_manifest(run_dir / "train" / "manifest.json")["counts"]["held_out_queries"] == len(held)
    for image in ("task_mix.png", "relabel.png", "train/model/loss.png", "eval/trained/score_vs_dim.png"):
        assert f"]({image})" in report and (run_dir / image).stat().st_size > 1000
    assert "| 384 |" in result.table() and yaml.safe_load((run_dir / "config.yaml").read_text())["relabel"]["top_n"] == 4


def test_rerun_skips_every_stage_without_an_llm_call(resumed):
    config, llm, result, _ = resumed
    calls = llm.backend_calls
    again = run_pipeline(config, llm=llm, progress=False)
    assert again.status == {stage: "skipped" for stage in STAGES}
    assert llm.backend_calls == calls
    assert again.table() == result.table()


def test_a_changed_key_reruns_its_stage_and_those_after_it(resumed):
    config, llm, result, _ = resumed
    calls = llm.backend_calls
    changed = load_config(demo_config(), [f"run_dir={result.run_dir}", *TINY, "train.steps=3"])
    again = run_pipeline(changed, llm=llm, progress=False)
    assert again.status == {"generate": "skipped", "relabel": "skipped", "train": "ran", "eval": "ran"}
    assert llm.backend_calls == calls
    assert read_manifest(result.run_dir / "train" / "manifest.json")["counts"]["steps"] == 3


def test_a_removed_output_is_rebuilt_and_identical_results_skip_what_follows(resumed):
    config, llm, result, _ = resumed
    calls = llm.backend_calls
    (result.run_dir / "relabel" / "relabeled.jsonl").unlink()
    changed = load_config(demo_config(), [f"run_dir={result.run_dir}", *TINY, "train.steps=3"])
    again = run_pipeline(changed, llm=llm, progress=False)
    # relabel runs again from the LLM cache and writes the same file: train's input is unchanged
    assert again.status == {"generate": "skipped", "relabel": "ran", "train": "skipped", "eval": "skipped"}
    assert llm.backend_calls == calls


def test_a_torn_manifest_resumes_the_stage_instead_of_deleting_its_work(resumed):
    config, llm, result, _ = resumed
    calls = llm.backend_calls
    journal = result.run_dir / "relabel" / "relabeled.jsonl.journal"
    kept = journal.read_text()
    (result.run_dir / "relabel" / "manifest.json").write_text("")  # as if torn by a crash
    again = run_pipeline(load_config(demo_config(), [f"run_dir={result.run_dir}", *TINY, "train.steps=3"]), llm=llm, progress=False)
    assert again.status["relabel"] == "resumed" and journal.read_text().startswith(kept)
    assert llm.backend_calls == calls  # nothing scored again: the journal was kept


def test_gecko_demo_on_a_finished_run_skips_everything_and_loads_no_llm(resumed, monkeypatch, capsys):
    config, llm, result, _ = resumed

    def no_llm(*args, **kwargs):
        raise AssertionError("an LLM was loaded")

    monkeypatch.setattr("gecko.llm.load_llm", no_llm)
    assert main(["demo", "--out", str(result.run_dir), *TINY, "train.steps=3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| 384 |" in out and "report:" in out and "This demo shows the mechanics" in out
    assert all(read_manifest(result.run_dir / s / "manifest.json")["status"] == "done" for s in STAGES)
    again = run_pipeline(load_config(demo_config(), [f"run_dir={result.run_dir}", *TINY, "train.steps=3"]), progress=False)
    assert again.status == {stage: "skipped" for stage in STAGES}
