"""Dense retrieval of candidate passages: an existing embedder + FAISS, in bounded memory.

The corpus is encoded with `gecko.embed.Embedder`, whose on-disk cache is keyed by
the model's identity (a hash of its files) and the exact text embedded: a rerun over the same
corpus with the same model encodes nothing again, and an edited passage is re-encoded alone.
Vectors are L2-normalised, so inner product = cosine.

Memory, for n passages of dimension d (all-MiniLM-L6-v2: d = 384):
- the index: `flat` (exact, the default) and `ivf` keep 4·d bytes per passage: 1.54 GB for
  1M passages; `ivfpq` keeps `pq_bytes` (default 48) per passage plus ids: about 56 MB for 1M.
- encoding: one chunk of `encode_chunk` passages (default 65,536: 100 MB of float32) at a time,
  added to the index and dropped; `ivf`/`ivfpq` also hold a training sample of at most
  `train_size` vectors (default 100,000: 154 MB) once.
- search: `search_chunk` queries (default 1,024) at a time; only their top-N ids and scores
  (12 bytes each) are kept.
So a 1M-passage corpus needs about 1.7 GB for retrieval with `flat`, about 0.3 GB with
`ivfpq`, plus the passages' own text, which relabeling keeps for the LLM prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from gecko.corpus import Passage
from gecko.embed import Embedder, truncate
from gecko.models import DEFAULT
from gecko.options import option

INDEX_KINDS = ("flat", "ivf", "ivfpq")


class RetrieveError(ValueError):
    """Bad retrieval settings (index kind, format string)."""


@dataclass(frozen=True)
class RetrieveConfig:
    """How queries and passages are embedded and searched.

    `query_format` gets `{task}` and `{query}`: the paper retrieves with `t ⊕ q`. The default
    document format is MTEB's (title, space, text), the input all-MiniLM-L6-v2 was scored with;
    a Gecko-trained model wants the formats of `gecko.formats`. `batch_size`: the most texts
    embedded at once.
    """

    embedder: str = option(DEFAULT, "retriever: sentence-transformers folder (default: packaged all-MiniLM-L6-v2)")
    query_format: str = option("{task} {query}", "retriever input for a query (fields {task}, {query})")
    document_format: str = option("{title} {text}", "retriever input for a passage (fields {title}, {text})")
    index: str = option("flat", "flat: exact inner product; ivf / ivfpq: approximate", choices=INDEX_KINDS)
    nlist: int | None = option(None, cli=False)  # ivf / ivfpq cells; default 4·sqrt(n), at least 1
    nprobe: int = option(32, "ivf cells searched per query")
    pq_bytes: int = option(48, cli=False)
    train_size: int = option(100_000, cli=False)
    encode_chunk: int = option(65_536, cli=False)
    search_chunk: int = option(1_024, cli=False)
    batch_size: int = option(64, cli=False)
    device: str | None = option(None, "torch device for the embedder")
    cache_dir: str | None = option(None, "embedding cache (default: $GECKO_HOME/embeddings)")

    def __post_init__(self):
        if self.index not in INDEX_KINDS:
            raise RetrieveError(f"unknown index {self.index!r}; known: {', '.join(INDEX_KINDS)}")
        for name, fmt, keys in (
            ("query_format", self.query_format, {"task": "", "query": ""}),
            ("document_format", self.document_format, {"title": "", "text": ""}),
        ):
            try:
                fmt.format(**keys)
            except (KeyError, IndexError, ValueError) as err:
                raise RetrieveError(f"{name} {fmt!r}: {err!r}; allowed fields: {sorted(keys)}") from None

    def query_text(self, task: str, query: str) -> str:
        return self.query_format.format(task=task, query=query).strip()

    def document_text(self, passage: Passage) -> str:
        return self.document_format.format(title=passage.title, text=passage.text).strip()


@dataclass
class RetrieveTimes:
    encode_corpus_s: float = 0.0
    index_s: float = 0.0
    encode_queries_s: float = 0.0
    search_s: float = 0.0
    corpus_encoded: int = 0  # passages that were not in the embedding cache


class Retriever:
    """Top-N passages for query texts; the index is built on first use."""

    def __init__(self, passages: Sequence[Passage], config: RetrieveConfig = RetrieveConfig(), progress: bool = True, embedder=None):
        self.passages = list(passages)
        if not self.passages:
            raise RetrieveError("the corpus has no passages to retrieve from")
        self.config = config
        self.progress = progress
        self.embedder = embedder or Embedder(
            config.embedder, device=config.device, cache_dir=config.cache_dir, max_batch=config.batch_size, progress=progress
        )
        self.times = RetrieveTimes()
        self._index = None

    # ------------------------------------------------------------ embedding

    def _embed(self, texts: list[str], desc: str) -> np.ndarray:
        return truncate(self.embedder.embed(texts, desc=desc), None)

    def embed_queries(self, texts: list[str]) -> np.ndarray:
        start = time.perf_counter()
        emb = self._embed(texts, "encoding queries")
        self.times.encode_queries_s += time.perf_counter() - start
        return emb

    def embed_passages(self, indices: Sequence[int]) -> np.ndarray:
        return self._embed([self.config.document_text(self.passages[i]) for i in indices], "encoding passages")

    # ------------------------------------------------------------ index

    def _timed_embed_passages(self, indices: Sequence[int]) -> np.ndarray:
        start, before = time.perf_counter(), self.embedder.encoded
        emb = self.embed_passages(indices)
        self.times.encode_corpus_s += time.perf_counter() - start
        self.times.corpus_encoded += self.embedder.encoded - before
        return emb

    def build(self) -> None:
        import faiss
        import torch

        # faiss and torch share one OpenMP runtime: the count set here is torch's too, so it
        # follows torch's (set from the free cores or GECKO_LLM_THREADS) instead of lowering it
        faiss.omp_set_num_threads(torch.get_num_threads())
        n, cfg = len(self.passages), self.config
        dim = self.embedder.dim
        index_time = 0.0
        if cfg.index == "flat":
            index = faiss.IndexFlatIP(dim)
        else:
            nlist = max(1, min(cfg.nlist or int(4 * np.sqrt(n)), n))
            quantizer = faiss.IndexFlatIP(dim)
            if cfg.index == "ivf":
                index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            else:
                if dim % cfg.pq_bytes:
                    raise RetrieveError(f"pq_bytes {cfg.pq_bytes} must divide the embedding dimension {dim}")
                # 8-bit codes need 256 training points per sub-quantizer: fewer bits for tiny corpora
                nbits = max(1, min(8, int(np.log2(min(n, cfg.train_size)))))
                index = faiss.IndexIVFPQ(quantizer, dim, nlist, cfg.pq_bytes, nbits, faiss.METRIC_INNER_PRODUCT)
            # an evenly spaced sample: deterministic, and spans the whole corpus
            sample = np.unique(np.linspace(0, n - 1, num=min(n, max(cfg.train_size, nlist)), dtype=np.int64))
            train = self._timed_embed_passages(sample.tolist())
            start = time.perf_counter()
            index.train(train)
            index_time += time.perf_counter() - start
            del train
            index.nprobe = min(cfg.nprobe, nlist)
        for lo in range(0, n, cfg.encode_chunk):
            emb = self._timed_embed_passages(range(lo, min(lo + cfg.encode_chunk, n)))
            start = time.perf_counter()
            index.add(np.ascontiguousarray(emb, dtype=np.float32))
            index_time += time.perf_counter() - start
        self.times.index_s += index_time
        self._index = index

    def search(self, query_emb: np.ndarray, top_n: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, passage indices), each [queries, min(top_n, n)], best first; chunked."""
        if self._index is None:
            self.build()
        k = min(top_n, len(self.passages))
        start = time.perf_counter()
        scores = np.empty((len(query_emb), k), dtype=np.float32)
        ids = np.empty((len(query_emb), k), dtype=np.int64)
        for lo in range(0, len(query_emb), self.config.search_chunk):
            part = np.ascontiguousarray(query_emb[lo : lo + self.config.search_chunk], dtype=np.float32)
            scores[lo : lo + len(part)], ids[lo : lo + len(part)] = self._index.search(part, k)
        self.times.search_s += time.perf_counter() - start
        return scores, ids
