"""The embedding model, as every stage uses it (retrieve, relabel, encode, serve, evaluate, the pipeline).

Speed: a CPU forward pass costs about batch × longest-text tokens, so texts are sorted by their
exact token count (sentence-transformers sorts by characters) and batched under a token budget
(`batch_tokens`, at most `max_batch` texts): short texts go in large batches, long ones in small
batches whose activations stay in cache. `benchmarks/encode.py` measures it against
`SentenceTransformer.encode` on the same texts.

Disk cache (`cache=True`): `{cache_dir}/{model identity[:16]}/{shard}.npy` (float32, one row per
text) beside `{shard}.keys` (one sha256 hex key per line, written last, so a shard only counts once
complete). The key is sha256(model identity + NUL + prompt + text), so it covers (model, text,
prompt). It does not hold the dimension: the full embedding is stored once and every smaller
Matryoshka dimension is derived from it (`truncate(emb, d)`: the first d coordinates, L2-normalised
again). Encoding is flushed to a new shard every `flush_every` texts, so an interrupted run keeps
what it had encoded.

Model identity = sha256 over the model folder's files (relative path + content sha256 each;
README and hidden files skipped), so retrained weights or a changed config (pooling,
max_seq_length) never reuse stale vectors. File digests are memoised by `gecko.models.file_sha256`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

from gecko.models import DEFAULT, file_sha256, gecko_home, resolve_embedder

_SKIP = {"README.md", ".gitattributes"}


class EmbedError(ValueError):
    """A model, input or option that cannot be embedded with (or an embedding output that cannot be read)."""


def model_identity(path) -> str:
    root = Path(path)
    if root.is_file():
        return file_sha256(root)
    digest = hashlib.sha256()
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.name not in _SKIP and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise EmbedError(f"model {root}: no files")
    for file in files:
        digest.update(f"{file.relative_to(root).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def truncate(embeddings: np.ndarray, dim: int | None) -> np.ndarray:
    """The first `dim` coordinates (all when None), each row L2-normalised (zero rows stay zero)."""
    emb = np.asarray(embeddings, dtype=np.float32)
    if dim is not None:
        emb = emb[:, :dim]
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.where(norms == 0, 1, norms)


class Embedder:
    """A sentence-transformers model: `embed` gives its full-dimension outputs (through the disk
    cache when `cache`), `encode` the L2-normalised Matryoshka ones. `encoded` counts texts
    actually run through the model (cache misses), for tests and reports."""

    def __init__(self, model: str = DEFAULT, *, device: str | None = None, cache: bool = True, cache_dir=None,
                 batch_tokens: int = 4096, max_batch: int = 128, progress: bool = True, flush_every: int = 2048):
        if batch_tokens < 1 or max_batch < 1:
            raise EmbedError(f"batch_tokens and max_batch must be positive, got {batch_tokens} and {max_batch}")
        self.spec = model
        self.path = resolve_embedder(model)
        if not Path(self.path).exists():
            raise EmbedError(f"model {model}: {self.path}: no such file or directory")
        self.batch_tokens, self.max_batch = batch_tokens, max_batch
        self.progress, self.flush_every, self.cache = progress, flush_every, cache
        self._cache_root = Path(cache_dir) if cache_dir is not None else gecko_home() / "embeddings"
        self.encoded = 0
        self.model = self._load(device)
        self.prompts = {name: p for name, p in (self.model.prompts or {}).items() if p}  # MiniLM saves empty ones
        self.max_length = self.model.max_seq_length or self.model.tokenizer.model_max_length
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get())
        self._index: dict[str, tuple[Path, int]] | None = None
        self._shards: dict[Path, np.ndarray] = {}
        self._lock = threading.Lock()

    def _load(self, device):
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        quiet = not self.progress and hf_logging.is_progress_bar_enabled()
        if quiet:
            hf_logging.disable_progress_bar()
        try:
            return SentenceTransformer(str(self.path), device=device).eval()
        except (OSError, ValueError) as err:
            raise EmbedError(f"model {self.spec}: cannot load {self.path}: {err}") from None
        finally:
            if quiet:
                hf_logging.enable_progress_bar()

    @functools.cached_property
    def identity(self) -> str:
        return model_identity(self.path)

    @property
    def cache_dir(self) -> Path:
        return self._cache_root / self.identity[:16]

    @property
    def name(self) -> str:
        return self.spec if self.spec == DEFAULT else Path(self.path).name

    def describe(self) -> dict:
        return {"spec": self.spec, "path": str(self.path), "identity": self.identity, "dim": self.dim,
                "max_seq_length": self.model.max_seq_length}

    def check_dims(self, dims: int | None) -> None:
        if dims is not None and not 1 <= dims <= self.dim:
            raise EmbedError(f"dims {dims}: must be between 1 and the model's dimension {self.dim}")

    # ------------------------------------------------------------ embedding

    def encode(self, texts: list[str], prompt: str | None = None, dims: int | None = None) -> np.ndarray:
        """L2-normalised embeddings, cut to the first `dims` coordinates (Matryoshka) and normalised again."""
        self.check_dims(dims)
        emb = truncate(self.embed(texts, None, prompt=prompt), None)
        return truncate(emb, dims) if dims is not None else emb

    def encode_counted(self, texts: list[str], prompt: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """L2-normalised full embeddings and each text's token count (what a server reports as usage), uncached."""
        emb, tokens = self._run(texts, prompt, None)
        return truncate(emb, None), tokens

    def embed(self, texts: list[str], desc: str | None = "encoding", *, prompt: str | None = None) -> np.ndarray:
        """Full-dimension float32 model outputs for `prompt + text`, in order, from the cache where it has
        them; `desc` labels the progress bar (None: no bar)."""
        if not self.cache:
            return self._run(texts, prompt, desc)[0]
        keys = [self._key((prompt or "") + t) for t in texts]
        with self._lock:
            index = self._load_index()
            missing = {k: t for k, t in zip(keys, texts) if k not in index}
            if missing:
                self._encode_and_store(missing, prompt, desc)
            rows = [self._row(index[k]) for k in keys]
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack(rows).astype(np.float32, copy=False)

    def _run(self, texts: list[str], prompt: str | None, desc: str | None) -> tuple[np.ndarray, np.ndarray]:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        tokens = self.count_tokens(texts, prompt)
        for rows, emb in self._batches(texts, prompt, tokens, desc):
            out[rows] = emb
        return out, tokens

    def count_tokens(self, texts: list[str], prompt: str | None = None) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.int64)
        prefix = prompt or ""
        ids = self.model.tokenizer([prefix + t for t in texts], truncation=True, max_length=self.max_length, verbose=False)["input_ids"]
        return np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(texts))

    def _batches(self, texts: list[str], prompt: str | None, tokens: np.ndarray, desc: str | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row indices, their model outputs), one token-budget batch at a time, longest texts first."""
        import torch
        from sentence_transformers.util import batch_to_device
        from tqdm.auto import tqdm

        order = np.argsort(-tokens, kind="stable")
        start = 0
        with torch.inference_mode(), tqdm(total=len(texts), desc=desc, unit="text", disable=not (self.progress and desc), leave=False) as bar:
            while start < len(order):
                size = min(self.max_batch, max(1, self.batch_tokens // max(1, int(tokens[order[start]]))))
                rows = order[start : start + size]
                features = self.model.preprocess([texts[i] for i in rows], prompt=prompt)
                emb = self.model(batch_to_device(features, self.model.device))["sentence_embedding"]
                self.encoded += len(rows)
                bar.update(len(rows))
                yield rows, emb.float().cpu().numpy()
                start += size

    # ------------------------------------------------------------ cache

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self.identity}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()

    def _encode_and_store(self, missing: dict[str, str], prompt: str | None, desc: str | None) -> None:
        keys, texts = list(missing), list(missing.values())
        done: list[np.ndarray] = []  # row indices not yet stored
        pending: list[np.ndarray] = []
        try:
            for rows, emb in self._batches(texts, prompt, self.count_tokens(texts, prompt), desc):
                done.append(rows)
                pending.append(emb)
                if sum(map(len, done)) >= self.flush_every:
                    self._store([keys[i] for i in np.concatenate(done)], np.concatenate(pending))
                    done, pending = [], []
        finally:
            if done:  # keep what was encoded, even when interrupted
                self._store([keys[i] for i in np.concatenate(done)], np.concatenate(pending))

    def _store(self, keys: list[str], emb: np.ndarray) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        npy, keyfile = self.cache_dir / f"{name}.npy", self.cache_dir / f"{name}.keys"
        tmp = self.cache_dir / f".{name}.npy.tmp"
        with tmp.open("wb") as handle:
            np.save(handle, emb)
        os.replace(tmp, npy)
        tmp = self.cache_dir / f".{name}.keys.tmp"
        tmp.write_text("".join(k + "\n" for k in keys), encoding="ascii")
        os.replace(tmp, keyfile)  # the shard becomes visible only now, complete
        self._shards[npy] = emb
        for i, key in enumerate(keys):
            self._index[key] = (npy, i)

    def _load_index(self) -> dict[str, tuple[Path, int]]:
        if self._index is None:
            self._index = {}
            if self.cache_dir.is_dir():
                for keyfile in sorted(self.cache_dir.glob("*.keys")):
                    npy = keyfile.with_suffix(".npy")
                    if not npy.is_file():
                        continue
                    for i, key in enumerate(keyfile.read_text(encoding="ascii").split()):
                        self._index.setdefault(key, (npy, i))
        return self._index

    def _row(self, loc: tuple[Path, int]) -> np.ndarray:
        shard, i = loc
        arr = self._shards.get(shard)
        if arr is None:
            arr = self._shards[shard] = np.load(shard, mmap_mode="r")
        return arr[i]
