"""Embedding with a disk cache, prompt formatting and Matryoshka truncation.

Cache layout: `{cache_dir}/{model identity[:16]}/{shard}.npy` (float32, one row per text) beside
`{shard}.keys` (one sha256 hex key per line, written last, so a shard only counts once complete).
The key is sha256(model identity + NUL + the exact text embedded), and the text already holds the
prompt, so the key covers (model, text, prompt). It does not hold the dimension: the full
embedding is stored once and every smaller Matryoshka dimension is derived from it
(`truncate(emb, d)`: the first d coordinates, L2-normalised again). Encoding is flushed to a new
shard every `flush_every` texts, so an interrupted run keeps what it had encoded.

Model identity = sha256 over the model folder's files (relative path + content sha256 each;
README and hidden files skipped), so retrained weights or a changed config (pooling,
max_seq_length) never reuse stale vectors. File digests are memoised by `gecko.models.file_sha256`.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from pathlib import Path

import numpy as np

from gecko.evaluate.tasks import EvalError
from gecko.formats import format_document, format_query, is_document_prompt, plain_document
from gecko.models import DEFAULT, file_sha256, gecko_home, resolve_embedder

_SKIP = {"README.md", ".gitattributes"}


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
        raise EvalError(f"model {root}: no files")
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


PROMPT_MODES = ("model", "gecko", "none")


class Prompts:
    """How texts become model inputs, in one of three modes:

    * `gecko`: the paper's formats for every model: query side `task: {task} | query: {text}`,
      documents `title: {title} | text: {text}`, symmetric tasks the query format on both sides;
    * `none`: the plain texts, as MTEB embeds models without instructions (the base model "as
      MTEB scores it");
    * `model`: as the model says to use it: the prompts saved with it (`gecko train` saves the ones
      its card recommends) by task name, then `query` for any retrieval query; a text with no saved
      prompt is embedded plain, so a model without prompts is scored exactly as in `none`.
    """

    def __init__(self, mode: str | bool = "gecko", saved: dict[str, str] | None = None):
        mode = {True: "gecko", False: "none"}.get(mode, mode) if isinstance(mode, bool) else mode
        if mode not in PROMPT_MODES:
            raise EvalError(f"prompts must be one of {', '.join(PROMPT_MODES)}, not {mode!r}")
        self.mode = mode
        self.saved = dict(saved or {}) if mode == "model" else {}

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def _saved_query(self, task) -> str | None:
        return self.saved.get(task.name) or (self.saved.get("query") if task.type == "retrieval" else None)

    def query(self, text: str, task) -> str:
        """A query-side text of `task` (queries; both sides of STS and classification)."""
        if self.mode == "gecko":
            return format_query(text, task.prompt)
        prefix = self._saved_query(task) if self.mode == "model" else None
        return prefix + text if prefix else text

    def document(self, title: str, text: str) -> str:
        prefix = self.saved.get("document")
        if self.mode == "gecko" or is_document_prompt(prefix):
            return format_document(text, title)
        if prefix:
            return prefix + text
        return plain_document(text, title)

    def describe(self, task) -> dict:
        symmetric = task.type != "retrieval"
        query = self.query("{text}", task)
        return {"mode": self.mode, "query": query, "document": query if symmetric else self.document("{title}", "{text}")}


class Embedder:
    """A sentence-transformers model behind a disk cache of full-dimension embeddings.

    `encoded` counts texts actually run through the model (cache misses), for tests and reports.
    """

    def __init__(
        self,
        model: str = DEFAULT,
        *,
        device: str | None = None,
        cache_dir=None,
        batch_size: int = 64,
        progress: bool = True,
        flush_every: int = 2048,
        use_cache: bool = True,
    ):
        self.spec = model
        self.path = resolve_embedder(model)
        if not Path(self.path).exists():
            raise EvalError(f"model {model}: {self.path}: no such file or directory")
        self.device = device
        self.batch_size = batch_size
        self.progress = progress
        self.flush_every = flush_every
        self.use_cache = use_cache
        self.identity = model_identity(self.path)
        root = Path(cache_dir) if cache_dir is not None else gecko_home() / "embeddings"
        self.cache_dir = root / self.identity[:16]
        self.encoded = 0
        self._model = None
        self._index: dict[str, tuple[Path, int]] | None = None
        self._shards: dict[Path, np.ndarray] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ model

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            from transformers.utils import logging as hf_logging

            quiet = not self.progress and hf_logging.is_progress_bar_enabled()
            if quiet:
                hf_logging.disable_progress_bar()
            try:
                self._model = SentenceTransformer(str(self.path), device=self.device)
            except (OSError, ValueError) as err:
                raise EvalError(f"model {self.spec}: cannot load {self.path}: {err}") from None
            finally:
                if quiet:
                    hf_logging.enable_progress_bar()
        return self._model

    @property
    def dim(self) -> int:
        model = self.model
        get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(get())

    def describe(self) -> dict:
        info = {"spec": self.spec, "path": str(self.path), "identity": self.identity}
        if self._model is not None:
            info["dim"] = self.dim
            info["max_seq_length"] = getattr(self._model, "max_seq_length", None)
        return info

    # ------------------------------------------------------------ embedding

    def embed(self, texts: list[str], desc: str = "encoding") -> np.ndarray:
        """Full-dimension float32 embeddings of `texts` (in order), from the cache where possible."""
        keys = [self._key(t) for t in texts]
        with self._lock:
            index = self._load_index()
            missing: dict[str, str] = {}
            for key, text in zip(keys, texts):
                if key not in index and key not in missing:
                    missing[key] = text
            if missing:
                self._encode_and_store(missing, desc)
            rows = [self._row(index[k]) for k in keys]
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack(rows).astype(np.float32, copy=False)

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self.identity}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()

    def _encode_and_store(self, missing: dict[str, str], desc: str) -> None:
        from tqdm.auto import tqdm

        items = sorted(missing.items(), key=lambda kv: len(kv[1]), reverse=True)  # similar lengths share batches
        step = max(self.batch_size * 4, 1)  # progress granularity
        bar = tqdm(total=len(items), desc=desc, unit="text", disable=not self.progress, leave=False)
        pending_keys: list[str] = []
        pending: list[np.ndarray] = []
        try:
            for start in range(0, len(items), step):
                chunk = items[start : start + step]
                emb = self.model.encode(
                    [text for _, text in chunk],
                    batch_size=self.batch_size,
                    normalize_embeddings=False,
                    show_progress_bar=False,
                    convert_to_numpy=True,
                )
                self.encoded += len(chunk)
                pending_keys += [k for k, _ in chunk]
                pending.append(np.asarray(emb, dtype=np.float32))
                if len(pending_keys) >= self.flush_every:
                    self._store(pending_keys, np.concatenate(pending))
                    pending_keys, pending = [], []
                bar.update(len(chunk))
        finally:
            if pending_keys:  # keep what was encoded, even when interrupted
                self._store(pending_keys, np.concatenate(pending))
            bar.close()

    def _store(self, keys: list[str], emb: np.ndarray) -> None:
        if self.use_cache:
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
        else:
            shard = Path(f"memory:{uuid.uuid4().hex}")
            self._shards[shard] = emb
            for i, key in enumerate(keys):
                self._index[key] = (shard, i)

    def _load_index(self) -> dict[str, tuple[Path, int]]:
        if self._index is None:
            self._index = {}
            if self.use_cache and self.cache_dir.is_dir():
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
