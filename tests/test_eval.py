"""`gecko eval`: every task type end to end on small real slices, the cache, Matryoshka dims, bad input.

Slices of the shared data (SciFact: 40 test queries over 200 documents; STS-B: 200 test pairs;
Banking77: 10 intents) keep this under a minute or two on one CPU thread with the packaged
all-MiniLM-L6-v2. The full reference check (all data vs MTEB's published scores) is marked `full`.
"""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gecko.cli import main
from gecko.evaluate import (
    ClassificationTask,
    Embedder,
    EvalError,
    RetrievalTask,
    STSTask,
    evaluate,
    load_results,
    resolve_task,
    truncate,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def slices(tmp_path_factory, shared_data) -> Path:
    root = tmp_path_factory.mktemp("eval-data")
    # SciFact: the first 40 judged test queries, their relevant documents, then other documents up to 200
    sci = root / "scifact"
    sci.mkdir()
    rows = [line.rstrip("\n").split("\t") for line in (shared_data / "scifact" / "qrels.test.tsv").open()][1:]
    qids = list(dict.fromkeys(q for q, _, _ in rows))[:40]
    keep = [r for r in rows if r[0] in qids]
    relevant = {d for _, d, _ in keep}
    docs = [json.loads(line) for line in gzip.open(shared_data / "scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8")]
    chosen = [d for d in docs if d["_id"] in relevant]
    chosen += [d for d in docs if d["_id"] not in relevant][: 200 - len(chosen)]
    (sci / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in chosen), encoding="utf-8")
    queries = [json.loads(line) for line in gzip.open(shared_data / "scifact" / "queries.jsonl.gz", "rt", encoding="utf-8")]
    (sci / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries if q["_id"] in qids), encoding="utf-8")
    (sci / "qrels.test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in keep))
    # STS-B: the first 200 test pairs
    (root / "stsb").mkdir()
    lines = (shared_data / "stsb" / "test.tsv").read_text(encoding="utf-8").splitlines()
    (root / "stsb" / "test.tsv").write_text("\n".join(lines[:201]) + "\n", encoding="utf-8")
    # Banking77: 10 intents; all their train rows, 10 test rows each
    bank = root / "banking77"
    bank.mkdir()
    labels = json.loads((shared_data / "banking77" / "categories.json").read_text())[:10]
    for name, per_label in (("train.csv", None), ("test.csv", 10)):
        with (shared_data / "banking77" / name).open(encoding="utf-8", newline="") as handle:
            data = [r for r in csv.DictReader(handle) if r["category"] in labels]
        if per_label:
            data = [r for label in labels for r in [x for x in data if x["category"] == label][:per_label]]
        with (bank / name).open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, ["text", "category"])
            writer.writeheader()
            writer.writerows(data)
    shutil.copy(shared_data / "banking77" / "categories.json", bank / "categories.json")
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval-cache")


def _task_args(slices: Path) -> list[str]:
    return [arg for name in ("scifact", "stsb", "banking77") for arg in ("--task", f"{name}={slices / name}")]


def _run(args, capsys) -> tuple[int, str, str]:
    rc = main(["eval", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def first_run(slices, cache, tmp_path_factory):
    """One CLI run with prompts over all three task types at two dims (shared by several tests)."""
    out = tmp_path_factory.mktemp("run1")
    rc = main(["eval", "--model", "default", *_task_args(slices), "--dims", "384,128", "--cache-dir", str(cache), "--out", str(out)])
    assert rc == 0
    return out


def test_cli_writes_json_table_plot_for_every_task_type(first_run):
    data = json.loads((first_run / "results.json").read_text())
    assert data["dims"] == [384, 128] and data["prompts"] is True
    assert data["model"]["spec"] == "default" and len(data["model"]["identity"]) == 64
    assert data["versions"]["sentence-transformers"] and data["versions"]["torch"]
    by_name = {t["task"]: t for t in data["tasks"]}
    assert set(by_name) == {"scifact", "stsb", "banking77"}
    expect = {"scifact": ("retrieval", "ndcg_at_10"), "stsb": ("sts", "cosine_spearman"), "banking77": ("classification", "accuracy")}
    for name, (kind, metric) in expect.items():
        t = by_name[name]
        assert (t["type"], t["split"], t["main_metric"]) == (kind, "test", metric)
        for dim in ("384", "128"):
            assert t["main_score"][dim] == t["scores"][dim][metric] == t["scores"][dim]["main_score"]
            assert 0.3 < t["main_score"][dim] <= 1.0, (name, dim, t["main_score"][dim])
    sci = by_name["scifact"]["scores"]["384"]
    assert {"ndcg_at_10", "recall_at_100", "mrr_at_10"} <= set(sci)
    assert by_name["scifact"]["sizes"] == {"documents": 200, "queries": 40, "qrels": by_name["scifact"]["sizes"]["qrels"]}
    # the prompts used are recorded
    assert by_name["scifact"]["prompts"]["query"] == "task: fact checking | query: {text}"
    assert by_name["scifact"]["prompts"]["document"] == "title: {title} | text: {text}"
    assert by_name["stsb"]["prompts"]["document"] == "task: sentence similarity | query: {text}"
    assert by_name["banking77"]["prompts"]["query"] == "task: classification | query: {text}"
    table = (first_run / "results.md").read_text()
    assert "| task | split | metric | 384 | 128 |" in table
    assert "| scifact | test | ndcg_at_10 |" in table and "| average |" in table
    assert (first_run / "score_vs_dim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("SciFact", "STSBenchmark", "Banking77Classification"):
        mteb_file = json.loads((first_run / "mteb" / "dim384" / f"{name}.json").read_text())
        assert mteb_file["task_name"] == name and mteb_file["scores"]["test"][0]["hf_subset"] == "default"


def test_results_load_in_mteb(first_run):
    mteb = pytest.importorskip("mteb")
    ours = load_results(first_run)
    result = mteb.TaskResult.from_disk(first_run / "mteb" / "dim128" / "SciFact.json")
    assert result.task_name == "SciFact"
    assert result.get_score() == pytest.approx(ours.task("scifact").main_score(128), abs=1e-6)


def test_second_run_hits_the_embedding_cache(first_run, slices, cache, tmp_path, capsys):
    first = json.loads((first_run / "results.json").read_text())
    assert first["model"]["encoded_texts"] > 200
    rc, _, _ = _run([*_task_args(slices), "--dims", "384,256,64", "--cache-dir", str(cache), "--out", str(tmp_path)], capsys)
    assert rc == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["model"]["encoded_texts"] == 0  # new dims come from the cached full embeddings
    scores = {t["task"]: t["main_score"] for t in again["tasks"]}
    before = {t["task"]: t["main_score"] for t in first["tasks"]}
    for name in scores:
        assert scores[name]["384"] == pytest.approx(before[name]["384"], abs=1e-6)


def test_no_prompts_and_baseline_delta(first_run, slices, cache, tmp_path, capsys):
    rc, out, _ = _run(
        [*_task_args(slices), "--dims", "384,128", "--no-prompts", "--baseline", str(first_run), "--cache-dir", str(cache),
         "--out", str(tmp_path), "--no-progress"],
        capsys,
    )
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["prompts"] is False
    sci = next(t for t in data["tasks"] if t["task"] == "scifact")
    assert sci["prompts"] == {"query": "{text}", "document": "{title} {text}", "task": None}
    assert data["baseline"]["prompts"] is True
    table = (tmp_path / "results.md").read_text()
    assert "| task | split | metric | 384 | Δ384 | 128 | Δ128 |" in table
    row = next(line for line in table.splitlines() if line.startswith("| stsb |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    base = load_results(first_run).task("stsb").main_score(384)
    ours = data["tasks"][1]["main_score"]["384"]
    assert cells[4] == f"{100 * (ours - base):+.2f}"
    assert "Δ384" in out  # the table is printed too


def test_baseline_can_be_a_model(slices, cache, tmp_path, capsys):
    rc, _, _ = _run(
        ["--task", f"stsb={slices / 'stsb'}", "--baseline", "default", "--no-prompts", "--cache-dir", str(cache),
         "--out", str(tmp_path), "--no-progress"],
        capsys,
    )
    assert rc == 0
    assert "| stsb | test | cosine_spearman | " in (tmp_path / "results.md").read_text()
    assert "+0.00" in (tmp_path / "results.md").read_text()  # the same model, scored twice


def test_progress_bar_while_encoding(slices, tmp_path, capsys):
    rc, _, err = _run(["--task", f"stsb={slices / 'stsb'}", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 0
    assert "stsb" in err and "text" in err  # tqdm's bar on stderr


def test_matryoshka_dims_truncate_and_renormalise(slices, cache):
    embedder = Embedder("default", cache_dir=cache, progress=False)
    full = embedder.embed(["a cat sat on the mat", "stock markets fell sharply"])
    assert full.shape == (2, 384)
    small = truncate(full, 64)
    assert small.shape == (2, 64)
    assert np.allclose(np.linalg.norm(small, axis=1), 1.0, atol=1e-5)
    assert np.allclose(small * np.linalg.norm(full[:, :64], axis=1, keepdims=True), full[:, :64], atol=1e-5)
    # a dim's score is the score of the truncated, re-normalised full embeddings
    from scipy.stats import spearmanr

    from gecko.evaluate.tasks import load_task_data

    task = resolve_task("stsb", slices / "stsb")
    data = load_task_data(task)
    res = evaluate(embedder, [task], [384, 32], prompts=False, backend="builtin")
    e1, e2 = (truncate(embedder.embed(s), 32) for s in (data.sentence1, data.sentence2))
    expected = spearmanr(data.scores, (e1 * e2).sum(axis=1))[0]
    assert res.task("stsb").main_score(32) == pytest.approx(expected, abs=1e-6)
    assert res.task("stsb").main_score(32) < res.task("stsb").main_score(384)


def test_builtin_scorer_matches_mteb(slices, cache):
    pytest.importorskip("mteb")
    embedder = Embedder("default", cache_dir=cache, progress=False)
    tasks = [f"{n}={slices / n}" for n in ("scifact", "stsb", "banking77")]
    ours = evaluate(embedder, tasks, [384, 128], prompts=True, backend="builtin")
    theirs = evaluate(embedder, tasks, [384, 128], prompts=True, backend="mteb")
    assert theirs.backend == "mteb" and ours.backend == "builtin"
    keys = {
        "scifact": ("ndcg_at_10", "ndcg_at_100", "recall_at_100", "recall_at_10", "mrr_at_10", "map_at_10", "precision_at_10"),
        "stsb": ("cosine_spearman", "cosine_pearson", "manhattan_spearman", "euclidean_spearman"),
        "banking77": ("accuracy", "f1", "f1_weighted"),
    }
    for name, metrics in keys.items():
        for dim in (384, 128):
            a, b = ours.task(name).scores[dim], theirs.task(name).scores[dim]
            for m in metrics:
                assert a[m] == pytest.approx(b[m], abs=1e-4), (name, dim, m, a[m], b[m])


def test_without_mteb_the_builtin_scorer_is_used(slices, cache, monkeypatch):
    from gecko.evaluate import mteb_backend

    monkeypatch.setattr(mteb_backend, "available", lambda: False)
    embedder = Embedder("default", cache_dir=cache, progress=False)
    res = evaluate(embedder, [f"stsb={slices / 'stsb'}"], prompts=False)
    assert res.backend == "builtin" and res.versions["mteb"] is None
    assert 0.5 < res.task("stsb").main_score(384) < 1
    with pytest.raises(EvalError, match="needs the mteb package"):
        evaluate(embedder, [f"stsb={slices / 'stsb'}"], backend="mteb")


def test_known_and_sniffed_task_types(slices, tmp_path):
    assert isinstance(resolve_task("scifact", slices / "scifact"), RetrievalTask)
    sts = resolve_task("sts13", slices / "stsb")
    assert isinstance(sts, STSTask) and sts.mteb_name == "STS13" and sts.prompt == "sentence similarity"
    # unknown names: typed by sniffing the folder
    assert isinstance(resolve_task("mine", slices / "scifact"), RetrievalTask)
    assert isinstance(resolve_task("mine", slices / "stsb"), STSTask)
    bank = resolve_task("intents", slices / "banking77")
    assert isinstance(bank, ClassificationTask) and bank.mteb_name is None and bank.prompt == "classification"


# ---------------------------------------------------------------- bad input


def _error(args, capsys) -> str:
    rc, _, err = _run([*args, "--no-progress"], capsys)
    assert rc == 2, err
    assert "gecko: error: " in err
    return err


def test_missing_file_is_named(slices, tmp_path, capsys):
    broken = tmp_path / "stsb"
    broken.mkdir()
    (broken / "dev.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t1\n")
    err = _error(["--task", f"stsb={broken}", "--out", str(tmp_path / "o")], capsys)
    assert "stsb" in err and str(broken / "test.tsv") in err and "no such file" in err
    err = _error(["--task", f"scifact={tmp_path / 'nowhere'}", "--out", str(tmp_path / "o")], capsys)
    assert "scifact" in err and "nowhere" in err
    sci = tmp_path / "sci"
    shutil.copytree(slices / "scifact", sci)
    (sci / "queries.jsonl").unlink()
    err = _error(["--task", f"scifact={sci}", "--out", str(tmp_path / "o")], capsys)
    assert "queries.jsonl" in err


def test_qrels_id_absent_from_corpus_is_named(slices, tmp_path, capsys):
    sci = tmp_path / "sci"
    shutil.copytree(slices / "scifact", sci)
    with (sci / "qrels.test.tsv").open("a") as handle:
        handle.write("1\t999999999\t1\n")
    err = _error(["--task", f"scifact={sci}", "--out", str(tmp_path / "o")], capsys)
    assert "'999999999'" in err and "not in the corpus" in err and "qrels.test.tsv:" in err


def test_unknown_task_type_is_named(slices, tmp_path, capsys):
    err = _error(["--task", f"mine:clustering={slices / 'stsb'}", "--out", str(tmp_path / "o")], capsys)
    assert "'clustering'" in err and "retrieval, sts, classification" in err
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "notes.txt").write_text("hello")
    err = _error(["--task", f"mine={odd}", "--out", str(tmp_path / "o")], capsys)
    assert "mine" in err and "cannot tell the task type" in err


def test_bad_rows_and_dims_are_named(slices, tmp_path, capsys):
    bad = tmp_path / "sts"
    bad.mkdir()
    (bad / "test.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t1\nc\td\thigh\n")
    err = _error(["--task", f"mysts={bad}", "--out", str(tmp_path / "o")], capsys)
    assert f"{bad / 'test.tsv'}:3" in err and "'high'" in err
    err = _error(["--task", f"stsb={slices / 'stsb'}", "--dims", "512", "--out", str(tmp_path / "o")], capsys)
    assert "dim 512" in err and "384" in err
    with pytest.raises(EvalError, match="unknown backend"):
        evaluate("default", [f"stsb={slices / 'stsb'}"], backend="nope")


# ---------------------------------------------------------------- full reference check


@pytest.mark.full
def test_reference_scores_full(shared_data):
    """All of SciFact, STS-B, STS12-14, STS16 and Banking77 within ±0.5 points of MTEB's numbers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_reference", ROOT / "benchmarks" / "eval_reference.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--check", "--data", str(shared_data)]) == 0
