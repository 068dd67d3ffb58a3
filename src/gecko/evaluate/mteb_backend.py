"""Scoring through `mteb` itself, fed our local files (works offline).

Each of our tasks becomes a subclass of the matching MTEB task class (SciFact, STSBenchmark, ...,
Banking77Classification; for other datasets a generic one of the right type, renamed) whose
`load_data` installs the already-validated local data instead of downloading. The model is an
MTEB `EncoderProtocol` that serves our cached embeddings, formatted with our prompts and truncated
to one Matryoshka dimension, so MTEB computes every metric and writes its usual result files.

`mteb` is optional (`pip install gecko[mteb]`); without it `gecko.evaluate.metrics` scores the same way.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from gecko.embed import truncate
from gecko.formats import Prompts

if TYPE_CHECKING:  # tasks imports this module to read mteb's task table
    from gecko.evaluate.tasks import Task


def available() -> bool:
    try:
        import mteb  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def ignore_identical_ids_by_task() -> dict[str, bool]:
    """mteb's `ignore_identical_ids` of each retrieval task it defines, by task name."""
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.get_tasks import TASK_LIST

    return {cls.metadata.name: bool(cls.ignore_identical_ids) for cls in TASK_LIST if issubclass(cls, AbsTaskRetrieval)}


@functools.lru_cache(maxsize=None)
def _task_class(mteb_name: str):
    import mteb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "superseded by ..." notices: we mirror the version we compare with
        return type(mteb.get_task(mteb_name))


def local_task(task: Task, data):
    """An instance of the MTEB task class for `task` whose data is `data` (from `load_task_data`)."""
    base = _task_class(task.mteb_name or task.mteb_generic)
    metadata = base.metadata
    if task.mteb_name is None:
        metadata = metadata.model_copy(update={"name": f"gecko-{task.name}", "eval_splits": [task.split]})

    def load_data(self, num_proc=None, **kwargs):
        self.dataset = task.mteb_dataset(data)
        self.data_loaded = True

    attrs: dict[str, Any] = {"metadata": metadata, "load_data": load_data, "__module__": __name__, **task.mteb_attrs(data)}
    cls = type(f"Local{base.__name__}", (base,), attrs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        instance = cls(seed=getattr(task, "seed", 42))
    instance.load_data()
    return instance


class CachedEncoder:
    """MTEB `EncoderProtocol` over `embed(texts) -> full embeddings`, at one Matryoshka dimension."""

    def __init__(self, embed: Callable[[list[str], str], np.ndarray], task: Task, prompts: Prompts, dim: int | None, meta):
        self._embed, self._task, self._prompts, self._dim = embed, task, prompts, dim
        self.mteb_model_meta = meta

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
        from mteb.types import PromptType

        texts: list[str] = []
        for batch in inputs:
            n = len(batch["text"])
            if prompt_type == PromptType.document:
                titles = batch.get("title") or [""] * n
                bodies = batch.get("body") or batch["text"]
                texts += [self._prompts.document(t, b) for t, b in zip(titles, bodies)]
            else:  # queries, and both sides of symmetric tasks
                texts += [self._prompts.query(t, self._task) for t in batch["text"]]
        side = "documents" if prompt_type == PromptType.document else "queries" if prompt_type == PromptType.query else "texts"
        return truncate(self._embed(texts, f"{self._task.name} {side}"), self._dim)

    def similarity(self, embeddings1, embeddings2):
        from mteb.similarity_functions import cos_sim

        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(embeddings1, embeddings2)


def model_meta(name: str, identity: str, dim: int | None, max_tokens: int | None):
    from mteb.models import ModelMeta

    return ModelMeta.create_empty({"name": name, "revision": identity[:40], "embed_dim": dim, "max_tokens": max_tokens,
                                   "similarity_fn_name": "cosine", "framework": ["Sentence Transformers"]})


def score(task: Task, data, embed, prompts: Prompts, dim: int | None, meta) -> tuple[dict, Any]:
    """(scores of `task` at `dim`, the MTEB `TaskResult`) computed by MTEB."""
    import time

    from mteb.results import TaskResult

    logging.getLogger("mteb").setLevel(logging.WARNING)
    instance = local_task(task, data)
    encoder = CachedEncoder(embed, task, prompts, dim, meta)
    start = time.monotonic()
    import datasets

    quiet = not datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # mteb's dataset.map() bars: noise; our own bars show encoding
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            by_subset = instance.evaluate(encoder, task.split, encode_kwargs={"batch_size": 256, "show_progress_bar": False})
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    result = TaskResult.from_task_results(instance, {task.split: by_subset}, evaluation_time=time.monotonic() - start)
    scores = dict(by_subset["default"])
    return scores, result
