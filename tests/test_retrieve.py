"""Dense retrieval for relabeling: exact FAISS search, approximate options, chunking, embedding cache."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from gecko.corpus import Passage
from gecko.retrieve import RetrieveConfig, RetrieveError, Retriever

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def passages(shared_data) -> list[Passage]:
    out = []
    with gzip.open(shared_data / "scifact" / "corpus.jsonl.gz", "rt") as handle:
        for _, line in zip(range(60), handle):
            d = json.loads(line)
            out.append(Passage(d["_id"], d["_id"], d["title"], d["text"]))
    return out


QUERIES = ["vitamin D and bone fractures", "DNA repair in cancer cells", "myelin basic protein gene structure"]


def test_flat_search_is_exact_and_chunking_changes_nothing(passages, tmp_path):
    r = Retriever(passages, RetrieveConfig(cache_dir=str(tmp_path)), progress=False)
    q = r.embed_queries(QUERIES)
    scores, ids = r.search(q, 10)
    doc = r.embed_passages(range(len(passages)))
    brute = q @ doc.T
    assert np.allclose(scores, np.sort(brute, axis=1)[:, ::-1][:, :10], atol=1e-5)
    assert np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)  # cosine = inner product
    for row, expect in zip(ids, np.argsort(-brute, axis=1)[:, :10]):
        assert list(row[:3]) == list(expect[:3])
    small = Retriever(passages, RetrieveConfig(cache_dir=str(tmp_path), encode_chunk=7, search_chunk=2), progress=False)
    s2, i2 = small.search(small.embed_queries(QUERIES), 10)
    assert np.array_equal(ids, i2) and np.allclose(scores, s2)


def test_rerun_encodes_nothing(passages, tmp_path):
    first = Retriever(passages, RetrieveConfig(cache_dir=str(tmp_path)), progress=False)
    first.build()
    assert first.times.corpus_encoded == len(passages)
    again = Retriever(passages, RetrieveConfig(cache_dir=str(tmp_path)), progress=False)
    again.build()
    assert again.times.corpus_encoded == 0  # keyed by model identity + passage text


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_approximate_indexes(passages, tmp_path, kind):
    exact = Retriever(passages, RetrieveConfig(cache_dir=str(tmp_path)), progress=False)
    q = exact.embed_queries(QUERIES)
    _, ids = exact.search(q, 5)
    approx = Retriever(passages, RetrieveConfig(cache_dir=str(tmp_path), index=kind, nlist=4, nprobe=4, pq_bytes=16), progress=False)
    scores, aids = approx.search(q, 5)
    assert aids.shape == (3, 5) and (aids >= 0).all()
    if kind == "ivf":  # probing every cell is exhaustive: the same top-5
        assert np.array_equal(np.sort(ids, axis=1), np.sort(aids, axis=1))
    else:  # compressed vectors: most of the exact top-5 still found
        assert np.mean([len(set(a) & set(b)) for a, b in zip(ids, aids)]) >= 2


def test_bad_settings_are_clear_errors():
    with pytest.raises(RetrieveError, match="unknown index"):
        RetrieveConfig(index="hnsw2")
    with pytest.raises(RetrieveError, match="query_format"):
        RetrieveConfig(query_format="{task} {question}")
    with pytest.raises(RetrieveError, match="no passages"):
        Retriever([], RetrieveConfig())
