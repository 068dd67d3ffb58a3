"""Corpus readers: every format, passage splitting, bad input (strict and lenient), the CLI."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gecko.cli import main
from gecko.corpus import (
    CorpusError,
    CorpusSummary,
    Passage,
    check_corpus,
    iter_passages,
    load_beir,
    load_corpus,
)

SCIFACT = Path("/work/shared/data/scifact")
DOCS = [
    {"_id": "d1", "title": "Geckos", "text": "Geckos are small lizards."},
    {"_id": "d2", "text": "They climb walls."},
]


def write_jsonl(path: Path, records, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    return path


def minilm():
    from transformers import AutoTokenizer

    from gecko.models import default_embedder_path

    return AutoTokenizer.from_pretrained(default_embedder_path())


# ---------------------------------------------------------------- formats


def test_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [*DOCS, {"id": 7, "text": "Numeric id, `id` alias."}])
    passages, summary = load_corpus(path)
    assert passages == [
        Passage("d1", "d1", "Geckos", "Geckos are small lizards."),
        Passage("d2", "d2", "", "They climb walls."),
        Passage("7", "7", "", "Numeric id, `id` alias."),
    ]
    assert (summary.documents, summary.passages, summary.skipped) == (3, 3, {})


def test_jsonl_gz(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl.gz", DOCS, opener=gzip.open)
    assert [p.id for p in iter_passages(path)] == ["d1", "d2"]


def test_field_overrides(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"pid": "a", "head": "H", "body": "B"}])
    (p,) = load_corpus(path, id_field="pid", title_field="head", text_field="body")[0]
    assert (p.id, p.title, p.text) == ("a", "H", "B")


def make_beir(root: Path, qrels_name: str, qrels_lines: list[str]) -> Path:
    root.mkdir()
    write_jsonl(root / "corpus.jsonl.gz", DOCS, opener=gzip.open)
    write_jsonl(root / "queries.jsonl", [{"_id": "q1", "text": "what are geckos"}, {"_id": "q2", "text": "unjudged"}])
    (root / qrels_name).parent.mkdir(exist_ok=True)
    (root / qrels_name).write_text("query-id\tcorpus-id\tscore\n" + "".join(line + "\n" for line in qrels_lines))
    return root


@pytest.mark.parametrize("qrels_name", ["qrels.test.tsv", "qrels/test.tsv"])
def test_beir_dir(tmp_path, qrels_name):
    root = make_beir(tmp_path / "beir", qrels_name, ["q1\td1\t1", "q1\td2\t0"])
    data = load_beir(root)
    assert [p.id for p in data.corpus] == ["d1", "d2"]
    assert data.queries == {"q1": "what are geckos"}  # only the judged queries of the split
    assert data.qrels == {"q1": {"d1": 1, "d2": 0}}
    assert check_corpus(root).documents == 2  # a BEIR dir is also a corpus path


@pytest.mark.parametrize("line, culprit", [("q9\td1\t1", "'q9'"), ("q1\tnope\t1", "'nope'")])
def test_beir_qrels_unknown_id(tmp_path, line, culprit):
    root = make_beir(tmp_path / "beir", "qrels.test.tsv", ["q1\td1\t1", line])
    with pytest.raises(CorpusError, match=rf"qrels\.test\.tsv:3: .*{culprit}"):
        load_beir(root)


def test_beir_missing_file(tmp_path):
    root = make_beir(tmp_path / "beir", "qrels.test.tsv", ["q1\td1\t1"])
    with pytest.raises(CorpusError, match="qrels.train.tsv"):
        load_beir(root, split="train")


def test_beir_scifact():
    data = load_beir(SCIFACT)
    assert (len(data.corpus), len(data.queries), sum(map(len, data.qrels.values()))) == (5183, 300, 339)


def test_parquet(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", "y"], "extra": [1, 2]}), path)
    assert [(p.id, p.title, p.text) for p in iter_passages(path)] == [("a", "", "x"), ("b", "", "y")]


def test_csv(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('_id,title,text\na,T,"one, with comma"\nb,,"two\nlines"\n', encoding="utf-8")
    assert [(p.id, p.title, p.text) for p in iter_passages(path)] == [("a", "T", "one, with comma"), ("b", "", "two\nlines")]


def test_tsv_has_no_quoting(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text('id\ttext\na\t"quoted" word\n', encoding="utf-8")
    assert [(p.id, p.text) for p in iter_passages(path)] == [("a", '"quoted" word')]


def test_text_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "sub" / "b.md").write_text("intro\n# The Heading\nbody")
    (tmp_path / "c.md").write_text("no heading")
    (tmp_path / ".hidden.txt").write_text("ignored")
    (tmp_path / "notes.json").write_text("ignored")
    got = {p.id: p.title for p in iter_passages(tmp_path)}
    assert got == {"a": "a", "sub/b": "The Heading", "c": "c"}


def test_missing_path(tmp_path):
    with pytest.raises(CorpusError, match="nope.jsonl: no such file"):
        check_corpus(tmp_path / "nope.jsonl")


def test_unknown_type(tmp_path):
    path = tmp_path / "c.xml"
    path.write_text("<doc/>")
    with pytest.raises(CorpusError, match=r"c\.xml: unsupported .*\.jsonl.*\.parquet.*\.csv"):
        check_corpus(path)


# ---------------------------------------------------------------- splitting


def test_split_into_passages(tmp_path):
    long_text = " ".join(f"Sentence number {i} talks about geckos and their sticky feet." for i in range(40))
    path = write_jsonl(tmp_path / "c.jsonl", [{"_id": "long", "title": "T", "text": long_text}, {"_id": "short", "text": "Tiny."}])
    passages, summary = load_corpus(path, max_tokens=32)
    long = [p for p in passages if p.doc_id == "long"]
    assert [p.id for p in long] == [f"long#{k}" for k in range(len(long))] and len(long) > 1
    assert passages[-1] == Passage("short", "short", "", "Tiny.")  # a document that fits keeps its id
    tok = minilm()
    assert all(len(tok(p.text, add_special_tokens=False)["input_ids"]) <= 32 for p in long)
    assert all(p.title == "T" and p.text in long_text for p in long)  # verbatim slices, title on each
    assert "".join(p.text for p in long).replace(" ", "") == long_text.replace(" ", "")
    assert all(p.text.endswith(".") for p in long)  # broke at sentence ends
    assert (summary.documents, summary.passages) == (2, len(passages))


def test_split_word_longer_than_budget(tmp_path):
    word = "gecko" * 18  # one word of 36 word pieces
    passages, _ = load_corpus(write_jsonl(tmp_path / "c.jsonl", [{"_id": "x", "text": word}]), max_tokens=8)
    assert len(passages) > 1 and "".join(p.text for p in passages) == word
    tok = minilm()
    assert all(len(tok(p.text, add_special_tokens=False)["input_ids"]) <= 8 for p in passages)


# ---------------------------------------------------------------- bad input

BAD_JSONL = {  # second line of the file is bad in each case
    "invalid-json": b'{"_id": "x", "text": ',
    "missing-text": b'{"_id": "x", "title": "no text"}',
    "non-utf8": b'{"_id": "x", "text": "caf\xe9"}',
    "duplicate-id": b'{"_id": "d1", "text": "again"}',
    "missing-id": b'{"text": "who am I"}',
}


@pytest.mark.parametrize("reason", BAD_JSONL)
def test_bad_jsonl(tmp_path, reason):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"_id": "d1", "text": "fine"}\n' + BAD_JSONL[reason] + b'\n{"_id": "d3", "text": "fine"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: "):
        load_corpus(path)
    passages, summary = load_corpus(path, lenient=True)
    assert [p.id for p in passages] == ["d1", "d3"]  # duplicates: the first one is kept
    assert summary.skipped == {reason: 1}


def test_non_string_text(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"_id": "x", "text": 5}])
    with pytest.raises(CorpusError, match=r"bad\.jsonl:1: .*'text'"):
        load_corpus(path)


def test_bad_csv_reports_physical_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b'id,text\na,"multi\nline"\nb,caf\xe9\na,dup\n')
    with pytest.raises(CorpusError, match=r"bad\.csv:4: invalid UTF-8"):
        load_corpus(path)
    passages, summary = load_corpus(path, lenient=True)
    assert [p.id for p in passages] == ["a"] and summary.skipped == {"non-utf8": 1, "duplicate-id": 1}
    path.write_bytes(b'id,text\na,"multi\nline"\nb,x\na,dup\n')
    with pytest.raises(CorpusError, match=r"bad\.csv:5: duplicate id 'a' \(first at .*bad\.csv:2\)"):
        load_corpus(path)


def test_bad_parquet_reports_row(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"_id": ["a", "b"], "text": ["x", None]}), path)
    with pytest.raises(CorpusError, match=r"bad\.parquet:row 2: missing or non-string text"):
        load_corpus(path)


def test_missing_column_is_fatal(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("id,body\na,x\n")
    with pytest.raises(CorpusError, match=r"c\.csv: no text column 'text'"):
        load_corpus(path, lenient=True)


def test_empty_passages_skipped_and_counted(tmp_path):
    records = [{"_id": "a", "text": ""}, {"_id": "b", "text": " \n\t"}, {"_id": "c", "title": "title only", "text": ""}]
    summary = check_corpus(write_jsonl(tmp_path / "c.jsonl", records))  # strict: never an error
    assert (summary.documents, summary.skipped) == (1, {"empty": 2})
    assert summary.to_dict() == {"path": str(tmp_path / "c.jsonl"), "documents": 1, "passages": 1, "skipped": {"empty": 2}}


def test_summary_render():
    summary = CorpusSummary("c.jsonl", documents=3, passages=5)
    summary.skipped.update({"empty": 2, "duplicate-id": 1})
    assert summary.render().splitlines() == [
        "corpus: c.jsonl", "documents: 3", "passages: 5", "skipped: 3", "  duplicate-id: 1", "  empty: 2"
    ]


# ---------------------------------------------------------------- CLI


def test_cli_bad_file(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"_id": "a", "text": "ok"}\nnot json\n')
    assert main(["corpus", "check", str(path)]) == 2
    assert f"gecko: error: {path}:2: invalid JSON" in capsys.readouterr().err
    assert main(["corpus", "check", "--lenient", str(path)]) == 0
    assert "invalid-json: 1" in capsys.readouterr().out


def test_cli_subprocess_good_file(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", DOCS)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "gecko.cli", "corpus", "check", "--max-tokens", "4", str(path)],
        env=env, capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "documents: 2" in done.stdout and "skipped: 0" in done.stdout
