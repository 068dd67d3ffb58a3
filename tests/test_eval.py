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
from gecko.embed import Embedder, truncate
from gecko.evaluate import (
    ClassificationTask,
    EvalError,
    RetrievalTask,
    STSTask,
    evaluate,
    load_results,
    load_task_data,
    resolve_task,
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
    rc = main(["eval", "--model", "default", *_task_args(slices), "--dims", "384,128", "--cache-dir", str(cache), "--out", str(out),
               "--prompts", "gecko"])
    assert rc == 0
    return out


def test_prompt_modes_model_gecko_none():
    from gecko.evaluate.tasks import RetrievalTask, STSTask
    from gecko.formats import Prompts

    sci, other, sts = RetrievalTask("scifact", ".", prompt="fact checking"), RetrievalTask("mine", "."), STSTask("stsb", ".")
    saved = {"query": "task: search result | query: ", "document": "title: none | text: ", "scifact": "task: fact checking | query: "}
    model = Prompts("model", saved)
    assert model.query("q", sci) == "task: fact checking | query: q" and model.query("q", other) == "task: search result | query: q"
    assert model.query("a sentence", sts) == "a sentence"  # no saved prompt for it: plain, as the card says
    assert model.document("T", "body") == "title: T | text: body"
    assert Prompts("gecko").query("a sentence", sts) == "task: sentence similarity | query: a sentence"
    plain = Prompts("model", {"query": "", "document": ""})  # what MiniLM saves: scored exactly as MTEB does
    assert [plain.query("q", sci), plain.document("T", "body")] == [Prompts("none").query("q", sci), "T body"]
    assert Prompts(False).mode == "none" and Prompts(True).mode == "gecko"
    with pytest.raises(ValueError, match="prompts must be one of"):
        Prompts("always")


def test_cli_writes_json_table_plot_for_every_task_type(first_run):
    data = json.loads((first_run / "results.json").read_text())
    assert data["dims"] == [384, 128] and data["prompts"] == "gecko"
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
    rc, _, _ = _run([*_task_args(slices), "--dims", "384,256,64", "--prompts", "gecko", "--cache-dir", str(cache), "--out", str(tmp_path)], capsys)
    assert rc == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["model"]["encoded_texts"] == 0  # new dims come from the cached full embeddings
    scores = {t["task"]: t["main_score"] for t in again["tasks"]}
    before = {t["task"]: t["main_score"] for t in first["tasks"]}
    for name in scores:
        assert scores[name]["384"] == pytest.approx(before[name]["384"], abs=1e-6)


def test_cache_keys_are_those_earlier_versions_wrote(tmp_path):
    """sha256(identity NUL prompt+text) in {cache}/{identity[:16]}/*.keys: existing caches keep serving."""
    import hashlib

    embedder = Embedder("default", cache_dir=tmp_path, progress=False)
    embedder.embed(["a cat"], prompt="task: x | query: ")
    (keys,) = (tmp_path / embedder.identity[:16]).glob("*.keys")
    assert keys.read_text().split() == [hashlib.sha256(f"{embedder.identity}\0task: x | query: a cat".encode()).hexdigest()]
    again = Embedder("default", cache_dir=tmp_path, progress=False)
    assert np.array_equal(again.embed(["task: x | query: a cat"]), embedder.embed(["a cat"], prompt="task: x | query: "))
    assert again.encoded == 0


def test_no_prompts_and_baseline_delta(first_run, slices, cache, tmp_path, capsys):
    rc, out, _ = _run(
        [*_task_args(slices), "--dims", "384,128", "--no-prompts", "--baseline", str(first_run), "--cache-dir", str(cache),
         "--out", str(tmp_path), "--no-progress"],
        capsys,
    )
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["prompts"] == "none"
    sci = next(t for t in data["tasks"] if t["task"] == "scifact")
    assert sci["prompts"] == {"mode": "none", "query": "{text}", "document": "{title} {text}", "task": None}
    assert data["baseline"]["prompts"] == "gecko"
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


def test_qrels_id_absent_from_corpus_is_named_with_strict(slices, tmp_path, capsys):
    sci = tmp_path / "sci"
    shutil.copytree(slices / "scifact", sci)
    with (sci / "qrels.test.tsv").open("a") as handle:
        handle.write("1\t999999999\t1\n")
    err = _error(["--task", f"scifact={sci}", "--strict", "--out", str(tmp_path / "o")], capsys)
    lines = (sci / "qrels.test.tsv").read_text().count("\n")
    assert f"qrels.test.tsv:{lines}: corpus id '999999999' is not in the corpus" in err


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


# ---------------------------------------------------------------- BEIR folders scored as BEIR / MTEB score them

# Quora-like: each query is a corpus document (same id) whose judged duplicate is another document
PAIRS = [
    ("How do I learn Python programming quickly?", "What is the fastest way to learn to program in Python?"),
    ("Why is the sky blue during the day?", "What makes the daytime sky appear blue?"),
    ("How can I lose weight without going to the gym?", "What are ways to lose weight at home without exercise equipment?"),
    ("What is the best way to save money on groceries?", "How do I spend less money when buying food at the supermarket?"),
    ("How do airplanes stay in the air?", "What keeps a plane flying in the sky?"),
    ("Which programming language should a beginner learn first?", "What is a good first programming language for beginners?"),
    ("How do I improve my English speaking skills?", "What is the best way to become fluent in spoken English?"),
    ("Why do cats purr?", "What is the reason cats make a purring sound?"),
]
OTHERS = ["How do I bake sourdough bread at home?", "What is the capital city of Australia?",
          "How do vaccines train the immune system?", "Is it safe to swim right after eating?"]
ABSENT = ["gone1", "gone2", "gone3"]  # judged documents the corpus file lacks, as in some of BEIR's qrels


@pytest.fixture(scope="module")
def dupes(tmp_path_factory) -> Path:
    """A BEIR folder with both properties: query ids that are corpus ids, and qrels naming absent documents
    (one query, not in the corpus, is judged against an absent document only)."""
    root = tmp_path_factory.mktemp("beir") / "dupes"
    root.mkdir()
    docs = [(f"{i}a", a) for i, (a, _) in enumerate(PAIRS)] + [(f"{i}b", b) for i, (_, b) in enumerate(PAIRS)]
    docs += [(f"x{i}", t) for i, t in enumerate(OTHERS)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n" for i, t in docs))
    queries = [(f"{i}a", a) for i, (a, _) in enumerate(PAIRS)] + [("q-extra", "Where did the missing document go?")]
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in queries))
    qrels = [(f"{i}a", f"{i}b") for i in range(len(PAIRS))] + [("1a", "gone1"), ("2a", "gone2"), ("q-extra", "gone3")]
    (root / "qrels.test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in qrels))
    return root


def _protocol(task: RetrievalTask) -> tuple[bool, str]:
    data = load_task_data(task)
    return data.ignore_identical_ids, data.identical_ids_rule


def test_identical_ids_follow_the_task_then_mteb_then_beir(dupes, slices):
    assert _protocol(resolve_task("mine", dupes)) == (True, "BEIR's default for a task that does not say")
    assert _protocol(resolve_task("quora", dupes)) == (True, "as mteb's QuoraRetrieval does")
    assert _protocol(resolve_task("fiqa", dupes)) == (True, "as mteb's FiQA2018 does")
    assert _protocol(resolve_task("nq", dupes)) == (False, "as mteb's NQ does")
    assert _protocol(resolve_task("scifact", dupes)) == (False, "as mteb's SciFact does")  # a known task's MTEB name
    assert _protocol(RetrievalTask("mine", dupes, ignore_identical_ids=False)) == (False, "as declared")
    assert _protocol(RetrievalTask("quora", dupes, ignore_identical_ids=False)) == (False, "as declared")
    assert _protocol(resolve_task("scifact", slices / "scifact")) == (False, "no query id is a corpus id")
    data = load_task_data(resolve_task("mine", dupes))
    assert data.query_ids_in_corpus == len(PAIRS) and len(data.queries) == len(PAIRS) + 1
    assert [doc for _, doc in data.absent] == ABSENT and data.qrels["q-extra"] == {"gone3": 1}  # kept, not dropped
    with pytest.raises(EvalError, match=r"qrels.test.tsv:10: corpus id 'gone1' is not in the corpus"):
        load_task_data(RetrievalTask("mine", dupes, strict=True))


def test_the_fallback_table_is_mteb_s(monkeypatch):
    from gecko.evaluate import mteb_backend
    from gecko.evaluate.tasks import MTEB_IGNORE_IDENTICAL_IDS, mteb_ignore_identical_ids

    if mteb_backend.available():
        theirs = mteb_backend.ignore_identical_ids_by_task()
        assert {name: theirs[name] for name in MTEB_IGNORE_IDENTICAL_IDS} == MTEB_IGNORE_IDENTICAL_IDS
        assert mteb_ignore_identical_ids("TRECDL2019") == ("TRECDL2019", True)  # beyond the table
    monkeypatch.setattr(mteb_backend, "available", lambda: False)
    assert mteb_ignore_identical_ids("quora") == ("QuoraRetrieval", True)
    assert mteb_ignore_identical_ids("webis-touche2020") == ("Touche2020", False)
    assert mteb_ignore_identical_ids("CQADupstack-Android") == ("CQADupstackAndroidRetrieval", False)
    assert mteb_ignore_identical_ids("mine") is None


def test_beir_folder_scores_match_mteb(dupes, cache):
    """Both properties at once, each identical-ids choice: the built-in scorer gives mteb's own numbers."""
    pytest.importorskip("mteb")
    embedder = Embedder("default", cache_dir=cache, progress=False)
    main_scores = {}
    for choice in (None, False):
        task = f"mine={dupes}"
        ours = evaluate(embedder, task, prompts=False, backend="builtin", ignore_identical_ids=choice).task("mine")
        theirs = evaluate(embedder, task, prompts=False, backend="mteb", ignore_identical_ids=choice).task("mine")
        assert ours.protocol == theirs.protocol and ours.protocol["ignore_identical_ids"] is (choice is None)
        a, b = ours.scores[384], theirs.scores[384]
        common = {k for k in a if k in b and isinstance(a[k], float)}
        assert {"ndcg_at_10", "map_at_100", "recall_at_10", "precision_at_1", "mrr_at_10", "hit_rate_at_1"} <= common
        for k in sorted(common):
            assert a[k] == pytest.approx(b[k], abs=1e-5), (choice, k, a[k], b[k])  # mteb rounds to 5 places
        main_scores[choice] = a["ndcg_at_10"]
    # a query's own document first costs a lot; the absent documents keep even the best ranking below 1
    assert main_scores[False] + 0.2 < main_scores[None] < 1.0


def test_cli_reports_and_records_the_beir_rules(dupes, cache, tmp_path, capsys):
    args = ["--task", f"mine={dupes}", "--no-prompts", "--backend", "builtin", "--cache-dir", str(cache), "--no-progress"]
    rc, _, err = _run([*args, "--out", str(tmp_path / "auto")], capsys)
    assert rc == 0, err
    lines = [line for line in err.splitlines() if line.startswith("gecko eval: task mine:")]
    assert len(lines) == 2, err
    assert f"{len(PAIRS)} of {len(PAIRS) + 1} query ids are also corpus ids" in lines[0] and "left out" in lines[0]
    assert "BEIR's default" in lines[0]
    assert f"{dupes / 'qrels.test.tsv'}: 3 qrels line(s) name documents absent from the corpus" in lines[1]
    assert "'gone1' (10)" in lines[1] and "--strict" in lines[1]
    auto = json.loads((tmp_path / "auto" / "results.json").read_text())["tasks"][0]
    assert auto["protocol"]["ignore_identical_ids"] is True and auto["protocol"]["query_ids_in_corpus"] == len(PAIRS)
    assert auto["protocol"]["qrels_absent_from_corpus"] == {"file": str(dupes / "qrels.test.tsv"), "count": 3, "first": ABSENT}
    assert load_results(tmp_path / "auto").task("mine").protocol == auto["protocol"]
    rc, _, err = _run([*args, "--ignore-identical-ids", "no", "--out", str(tmp_path / "no")], capsys)
    assert rc == 0 and "kept in its ranking (as declared" in err
    kept = json.loads((tmp_path / "no" / "results.json").read_text())["tasks"][0]
    assert kept["protocol"]["ignore_identical_ids"] is False
    assert kept["main_score"]["384"] < auto["main_score"]["384"]
    err = _error([*args, "--strict", "--out", str(tmp_path / "strict")], capsys)
    assert f"{dupes / 'qrels.test.tsv'}:10: corpus id 'gone1' is not in the corpus" in err


def test_scifact_has_no_identical_ids_so_the_reference_rows_are_untouched(shared_data):
    data = load_task_data(resolve_task("scifact", shared_data / "scifact"))
    assert data.query_ids_in_corpus == 0 and not data.absent
    assert (data.ignore_identical_ids, data.identical_ids_rule) == (False, "no query id is a corpus id")
    assert data.notes("scifact") == []


# ---------------------------------------------------------------- full reference check


@pytest.mark.full
def test_reference_scores_full(shared_data):
    """All of SciFact, STS-B, STS12-14, STS16 and Banking77 within ±0.5 points of MTEB's numbers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_reference", ROOT / "benchmarks" / "eval_reference.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--check", "--data", str(shared_data)]) == 0
