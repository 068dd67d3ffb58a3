"""The command line as a new user meets it: bad input is one `gecko: error:` line (exit 2, no
traceback, nothing left behind), `gecko rerank-eval` runs end to end at a tiny size, and the
options are the config dataclasses' fields with their defaults."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from gecko.cli import main

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "gecko" / "data" / "sample"
CORPUS = SAMPLE / "scifact-sample.jsonl"


def _one_error_line(capsys, needle: str) -> None:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "gecko: error: " in line]
    assert len(lines) == 1 and lines[0].startswith("gecko: error: ") and needle in lines[0], err
    assert "Traceback" not in err, err


@pytest.mark.parametrize("args, needle", [
    (["--llm", "bogus"], "unknown LLM spec 'bogus'"),
    (["--task-types", "poetry"], "unknown task type(s) ['poetry']"),
    (["--batch-size", "0"], "batch_size must be at least 1, got 0"),
])
def test_generate_bad_settings_are_one_line_and_leave_nothing(args, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GECKO_LLM_CACHE", str(tmp_path / "cache.sqlite"))
    assert main(["generate", "--corpus", str(CORPUS), "--out", str(tmp_path / "out" / "g.jsonl"), *args]) == 2
    _one_error_line(capsys, needle)
    assert not (tmp_path / "out").exists()  # no journal, no output


@pytest.mark.parametrize("args", [["llm", "generate", "--prompt", "x"], ["llm", "score", "--prefix", "a", "--continuation", "b"]])
def test_llm_commands_name_a_bad_spec(args, capsys):
    assert main([*args, "--llm", "bogus"]) == 2
    _one_error_line(capsys, "unknown LLM spec 'bogus'")


def test_serve_names_a_corpus_without_passages(tmp_path, capsys):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text('{"_id": "a", "text": "   "}\n{"_id": "b", "text": ""}\n')
    assert main(["serve", "--corpus", str(corpus), "--port", "1", "--cache-dir", str(tmp_path / "emb")]) == 2
    _one_error_line(capsys, f"{corpus}: no passages to search (skipped: 2 empty)")


def test_rerank_eval_end_to_end_on_a_tiny_beir_folder(tmp_path, capsys, monkeypatch):
    """Two judged queries over eight abstracts of the bundled mini SciFact, top 3, the packaged LLM."""
    mini = SAMPLE / "scifact-mini"
    qrels = [line.split("\t") for line in (mini / "qrels" / "test.tsv").read_text().splitlines()[1:3]]
    wanted = {d for _, d, _ in qrels}
    docs = [json.loads(line) for line in (mini / "corpus.jsonl").read_text().splitlines()]
    keep = [d for d in docs if d["_id"] in wanted] + [d for d in docs if d["_id"] not in wanted][:6]
    queries = {json.loads(line)["_id"]: json.loads(line) for line in (mini / "queries.jsonl").read_text().splitlines()}
    folder = tmp_path / "tiny"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in keep))
    (folder / "queries.jsonl").write_text("".join(json.dumps(queries[q]) + "\n" for q, _, _ in qrels))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in qrels))
    monkeypatch.setenv("GECKO_LLM_CACHE", str(tmp_path / "cache.sqlite"))
    monkeypatch.setenv("GECKO_LLM_THREADS", "1")
    out = tmp_path / "rerank.json"
    args = ["rerank-eval", "--dataset", str(folder), "--top-n", "3", "--max-passage-words", "30", "--cache-dir",
            str(tmp_path / "emb"), "--out", str(out), "--summary-json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out.read_text())
    assert result["queries"] == 2 and result["pairs"] == 6 and result["llm_calls"] > 0
    assert {"retriever", "+QL"} <= set(result["ndcg_at_10"]) and all(0 <= v <= 1 for v in result["ndcg_at_10"].values())
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["llm_calls"] == 0  # again: all from the cache


def test_deeply_nested_json_is_a_named_bad_record(tmp_path, capsys):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"_id": "a", "text": "fine"}\n{"_id": "b", "text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    assert main(["corpus", "check", str(path)]) == 2
    _one_error_line(capsys, f"{path}:2: invalid JSON: nested too deeply")


def test_a_corrupt_parquet_page_is_named(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"_id": [f"d{i}" for i in range(50)], "text": [f"text number {i} " * 20 for i in range(50)]}), path)
    data = bytearray(path.read_bytes())
    data[100:140] = b"\xff" * 40  # inside the first data page; the footer (schema) stays readable
    path.write_bytes(bytes(data))
    assert main(["corpus", "check", str(path)]) == 2
    _one_error_line(capsys, f"{path}: cannot read Parquet after row 0")


def test_options_are_the_config_fields_with_their_defaults():
    """Every field of the configs is an option; unset, the command builds the dataclass's defaults
    (train's options leave a --config file's values, so only --resume / --progress are set)."""
    from gecko.cli import build_parser
    from gecko.generate import GenerateConfig
    from gecko.options import given
    from gecko.relabel import RelabelConfig, ScoreConfig
    from gecko.retrieve import RetrieveConfig
    from gecko.serve import ServeConfig
    from gecko.train import TrainConfig

    parse = build_parser().parse_args
    assert GenerateConfig(**given(parse(["generate", "--corpus", "c", "--out", "o"]), GenerateConfig)) == GenerateConfig()
    assert ServeConfig(**given(parse(["serve"]), ServeConfig)) == ServeConfig()
    args = parse(["relabel", "--generated", "g", "--corpus", "c", "--out", "o"])
    score, retrieve = ScoreConfig(**given(args, ScoreConfig)), RetrieveConfig(**given(args, RetrieveConfig))
    assert RelabelConfig(**given(args, RelabelConfig), score=score, retrieve=retrieve) == RelabelConfig()
    assert parse(["rerank-eval", "--dataset", "d", "--labels", "Oui/Non"]).labels == (" Oui", " Non")
    args = parse(["train", "--data", "d.jsonl", "--out", "o", "--dims", "384,64", "--no-same-tower"])
    assert given(args, TrainConfig) == {"data": ["d.jsonl"], "out": "o", "dims": [384, 64], "same_tower": False,
                                        "resume": False, "progress": True}
    options = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} - options == {"pretrain"}  # its fields are --pretrain-*
