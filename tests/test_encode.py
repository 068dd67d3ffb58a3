"""`gecko encode`: same vectors as sentence-transformers, ids kept, prompts, Matryoshka dims, streaming, errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from gecko.cli import main  # noqa: E402
from gecko.corpus import CorpusError  # noqa: E402
import gecko.encode  # noqa: E402
import gecko.journal  # noqa: E402
from gecko.embed import EmbedError, Embedder  # noqa: E402
from gecko.encode import encode_file, input_format, load_embeddings  # noqa: E402
from gecko.models import default_embedder_path  # noqa: E402
from gecko.train import saved_prompts  # noqa: E402

DOCS = [
    {"_id": "d1", "title": "Cats", "text": "Cats purr when they are content."},
    {"_id": "d2", "title": "", "text": "Paris is the capital of France. " * 20},  # long: batched apart from the short ones
    {"_id": "d3", "title": "Rust", "text": "A systems language."},
    {"_id": "d4", "title": "", "text": "Bees make honey from nectar they gather from flowers."},
]


def _reference(model, texts, **kw) -> np.ndarray:
    return model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, **kw)


def _mteb_text(doc) -> str:
    return (doc["title"] + " " + doc["text"]).strip() if doc["title"] else doc["text"].strip()


@pytest.fixture(scope="module")
def encoder() -> Embedder:
    return Embedder(cache=False)


@pytest.fixture(scope="module")
def gecko_model(tmp_path_factory) -> Embedder:
    """The packaged MiniLM with the prompts `gecko train` saves (weights linked, not copied)."""
    src = default_embedder_path()
    root = tmp_path_factory.mktemp("gecko-model")
    for entry in os.listdir(src):
        if entry != "config_sentence_transformers.json":
            os.symlink(os.path.join(src, entry), root / entry)
    config = {"prompts": saved_prompts(), "default_prompt_name": None}
    (root / "config_sentence_transformers.json").write_text(json.dumps(config))
    return Embedder(str(root), cache=False)


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    return path


def test_cli_writes_npy_and_ids_equal_to_sentence_transformers(encoder, corpus, tmp_path, capsys):
    out = tmp_path / "out" / "emb.npy"
    assert main(["encode", "--input", str(corpus), "--out", str(out), "--summary-json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["texts"] == 4 and summary["dim"] == 384
    emb = np.load(out)
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    assert json.loads((tmp_path / "out" / "emb.ids.json").read_text()) == ["d1", "d2", "d3", "d4"]
    expected = _reference(encoder.model, [_mteb_text(d) for d in DOCS])
    assert np.allclose(emb, expected, atol=1e-5)  # length-sorted batches, rows back in input order
    assert sorted(os.listdir(tmp_path / "out")) == ["emb.ids.json", "emb.npy"]  # no temp files left


def test_dims_truncate_and_renormalise_and_chunks_change_nothing(encoder, corpus, tmp_path, monkeypatch):
    full = tmp_path / "full.parquet"
    encode_file(corpus, full, encoder, progress=False)
    table = pq.read_table(full)
    assert table.column("id").to_pylist() == ["d1", "d2", "d3", "d4"]
    full_emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    small = tmp_path / "small.npy"
    summary = encode_file(corpus, small, encoder, dims=64, chunk_size=3, progress=False)
    assert summary.texts == 4 and summary.dim == 64
    emb = np.load(small)
    cut = full_emb[:, :64] / np.linalg.norm(full_emb[:, :64], axis=1, keepdims=True)
    assert np.allclose(emb, cut, atol=1e-5) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    monkeypatch.setattr(encoder, "batch_tokens", 1)  # one text per batch
    assert np.allclose(encoder.encode([_mteb_text(d) for d in DOCS]), full_emb, atol=1e-5)


def test_text_file_ids_are_line_numbers(encoder, tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("first line\n\n   \nsecond one\nthird\n")
    summary = encode_file(path, tmp_path / "lines.npy", encoder, progress=False)
    assert summary.texts == 3 and summary.skipped == {"empty": 2}
    assert json.loads((tmp_path / "lines.ids.json").read_text()) == ["1", "4", "5"]
    assert np.allclose(np.load(tmp_path / "lines.npy"), _reference(encoder.model, ["first line", "second one", "third"]), atol=1e-5)


def test_prompts_of_a_gecko_trained_model(gecko_model, encoder, corpus, tmp_path):
    texts = [_mteb_text(d) for d in DOCS]
    st = gecko_model.model
    encode_file(corpus, tmp_path / "q.npy", gecko_model, as_="query", progress=False)
    assert np.allclose(np.load(tmp_path / "q.npy"), _reference(st, texts, prompt_name="query"), atol=1e-5)  # = encode_query
    encode_file(corpus, tmp_path / "t.npy", gecko_model, task="fact checking", progress=False)
    expected = _reference(st, texts, prompt="task: fact checking | query: ")
    assert np.allclose(np.load(tmp_path / "t.npy"), expected, atol=1e-5)
    encode_file(corpus, tmp_path / "d.npy", gecko_model, as_="document", progress=False)
    docs = [f"title: {d['title'] or 'none'} | text: {d['text']}" for d in DOCS]  # titles kept, untitled = the prompt
    assert np.allclose(np.load(tmp_path / "d.npy"), _reference(st, docs), atol=1e-5)
    # the plain MiniLM saves no prompts: --as adds nothing, --task still builds the query prompt
    assert input_format(encoder, "query").prompt is None and input_format(encoder, "document").prompt is None
    assert input_format(encoder, None, "x").prompt == "task: x | query: "
    with pytest.raises(EmbedError, match="--task"):
        input_format(gecko_model, "document", "fact checking")


def test_bad_input_fails_with_file_line_and_leaves_no_output(encoder, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "a", "text": "fine"}\n{"_id": "b", "text": oops}\n')
    out = tmp_path / "o" / "emb.npy"
    with pytest.raises(CorpusError, match=rf"{bad}:2: invalid JSON"):
        encode_file(bad, out, encoder, progress=False)
    assert not out.parent.exists() or os.listdir(out.parent) == []
    summary = encode_file(bad, out, encoder, lenient=True, progress=False)
    assert summary.texts == 1 and summary.skipped == {"invalid-json": 1}
    assert main(["encode", "--input", str(bad), "--out", str(tmp_path / "x.csv")]) == 2
    assert "must end in .npy or .parquet" in capsys.readouterr().err
    assert main(["encode", "--input", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(EmbedError, match="dims 999"):
        encode_file(bad, out, encoder, dims=999, lenient=True, progress=False)


def test_npy_and_ids_are_never_a_mismatched_pair(encoder, corpus, tmp_path, monkeypatch):
    out = tmp_path / "emb.npy"
    encode_file(corpus, out, encoder, progress=False)
    ids, emb = load_embeddings(out)
    assert ids == ["d1", "d2", "d3", "d4"] and emb.shape == (4, 384)
    parquet = tmp_path / "emb.parquet"
    encode_file(corpus, parquet, encoder, progress=False)
    assert load_embeddings(parquet)[0] == ids and np.allclose(load_embeddings(parquet)[1], emb)

    three = tmp_path / "three.jsonl"
    three.write_text("".join(json.dumps(d) + "\n" for d in DOCS[:3]))
    renamed, real = [], gecko.journal.replace_durably

    def killed_before_the_ids(tmp, path):  # the process dies between the two renames
        renamed.append((path.name, (tmp_path / "emb.ids.json").exists()))
        if path.name == "emb.ids.json":
            raise KeyboardInterrupt
        real(tmp, path)

    monkeypatch.setattr(gecko.journal, "replace_durably", killed_before_the_ids)
    with pytest.raises(KeyboardInterrupt):
        encode_file(three, out, encoder, progress=False)
    assert renamed == [("emb.npy", False), ("emb.ids.json", False)]  # the old ids were gone before the new .npy came
    assert np.load(out).shape == (3, 384)
    with pytest.raises(EmbedError, match=r"emb\.ids\.json: no such file"):
        load_embeddings(out)
    monkeypatch.undo()
    encode_file(three, out, encoder, progress=False)  # the same command again completes the pair
    assert load_embeddings(out)[0] == ["d1", "d2", "d3"]
    (tmp_path / "emb.ids.json").write_text('["d1", "d2"]')  # a pair not written together
    with pytest.raises(EmbedError, match=r"2 ids for the 3 rows"):
        load_embeddings(out)
