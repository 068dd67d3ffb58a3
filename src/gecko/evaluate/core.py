"""`evaluate(model, tasks, dims)`: MTEB-style scores of an embedder at each Matryoshka dimension."""

from __future__ import annotations

import dataclasses
import datetime
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from gecko.evaluate import metrics, mteb_backend
from gecko.evaluate.encoder import Embedder, Prompts, truncate
from gecko.evaluate.tasks import (
    ClassificationTask,
    EvalError,
    RetrievalData,
    RetrievalTask,
    STSTask,
    Task,
    load_task_data,
    parse_task_spec,
    resolve_task,
)

BACKENDS = ("auto", "mteb", "builtin")


@dataclass
class TaskScores:
    """One task's scores: `scores[dim]` is a flat MTEB score dict (0-1 scale, `main_score` included)."""

    task: str
    type: str
    split: str
    path: str
    main_metric: str
    mteb_task: str | None
    prompts: dict
    sizes: dict
    scores: dict[int, dict] = field(default_factory=dict)
    evaluation_time: float = 0.0
    protocol: dict = field(default_factory=dict)  # retrieval: identical ids and absent qrels, as `RetrievalData.protocol`

    def main_score(self, dim: int) -> float | None:
        entry = self.scores.get(dim)
        return None if entry is None else entry.get("main_score")

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "type": self.type,
            "split": self.split,
            "path": self.path,
            "main_metric": self.main_metric,
            "mteb_task": self.mteb_task,
            "prompts": self.prompts,
            "sizes": self.sizes,
            **({"protocol": self.protocol} if self.protocol else {}),
            "evaluation_time": round(self.evaluation_time, 3),
            "main_score": {str(d): s.get("main_score") for d, s in self.scores.items()},
            "scores": {str(d): s for d, s in self.scores.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "TaskScores":
        return cls(
            task=data["task"],
            type=data.get("type", ""),
            split=data.get("split", "test"),
            path=data.get("path", ""),
            main_metric=data.get("main_metric", "main_score"),
            mteb_task=data.get("mteb_task"),
            prompts=data.get("prompts", {}),
            sizes=data.get("sizes", {}),
            scores={int(d): s for d, s in data.get("scores", {}).items()},
            evaluation_time=data.get("evaluation_time", 0.0),
            protocol=data.get("protocol", {}),
        )


@dataclass
class Results:
    """A run: the model, the dims, how it was scored, and each task's scores."""

    model: dict
    dims: list[int]
    prompts: str  # the Prompts mode: model | gecko | none
    backend: str
    versions: dict
    tasks: list[TaskScores]
    created: str = ""
    mteb_results: dict = field(default_factory=dict, repr=False)  # (task, dim) -> mteb TaskResult, when scored by mteb

    def task(self, name: str) -> TaskScores | None:
        return next((t for t in self.tasks if t.task == name), None)

    def to_dict(self) -> dict:
        return {
            "format": "gecko-eval/1",
            "created": self.created,
            "model": self.model,
            "dims": self.dims,
            "prompts": self.prompts,
            "backend": self.backend,
            "versions": self.versions,
            "tasks": [t.to_dict() for t in self.tasks],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Results":
        if "tasks" not in data or "dims" not in data:
            raise EvalError("not a gecko eval results file (no 'tasks' and 'dims')")
        return cls(
            model=data.get("model", {}),
            dims=[int(d) for d in data["dims"]],
            prompts={True: "gecko", False: "none"}.get(data.get("prompts", True), data.get("prompts")),
            backend=data.get("backend", ""),
            versions=data.get("versions", {}),
            tasks=[TaskScores.from_dict(t) for t in data["tasks"]],
            created=data.get("created", ""),
        )

    @classmethod
    def load(cls, path) -> "Results":
        from gecko.evaluate.report import load_results

        return load_results(path)

    def table(self, baseline: "Results | None" = None) -> str:
        from gecko.evaluate.report import markdown_table

        return markdown_table(self, baseline)

    def write(self, out_dir, baseline: "Results | None" = None) -> dict[str, Path]:
        from gecko.evaluate.report import write_report

        return write_report(self, out_dir, baseline)


def as_tasks(tasks, **retrieval) -> list[Task]:
    """Tasks from Task objects, `NAME=PATH` strings or a {name: path} mapping; `retrieval` sets
    those `RetrievalTask` fields on every retrieval task (None leaves a field as the task has it)."""
    if isinstance(tasks, (str, Task)):
        tasks = [tasks]
    if isinstance(tasks, dict):
        out = [resolve_task(name, path) for name, path in tasks.items()]
    else:
        out = [t if isinstance(t, Task) else parse_task_spec(t) for t in tasks]
    given = {k: v for k, v in retrieval.items() if v is not None}
    out = [dataclasses.replace(t, **given) if given and isinstance(t, RetrievalTask) else t for t in out]
    if not out:
        raise EvalError("no tasks given")
    names = [t.name for t in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EvalError(f"task name(s) given twice: {', '.join(dupes)}")
    return out


def evaluate(
    model="default",
    tasks: Iterable = (),
    dims: Iterable[int] | None = None,
    *,
    prompts: str | bool = "model",
    backend: str = "auto",
    cache_dir=None,
    device: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
    ignore_identical_ids: bool | None = None,
    strict: bool | None = None,
) -> Results:
    """Score `model` on `tasks` at each of `dims` (default: its full dimension).

    `model`: an embedder folder, `default` (the packaged all-MiniLM-L6-v2) or an `Embedder`.
    `prompts` (see `Prompts`): `model` (default) embeds as the model says to use it (its saved
    prompts; none saved: the plain texts, as MTEB scores models without instructions), `gecko` the
    paper's formats for any model (True), `none` the plain texts (False).
    `backend`: `mteb` (MTEB's own evaluators on our local data), `builtin` (`gecko.evaluate.metrics`,
    same definitions, no `mteb` needed), or `auto` (mteb when installed). All data is loaded and
    validated before anything is embedded; embeddings come from the on-disk cache when present.
    `ignore_identical_ids` / `strict`: override those `RetrievalTask` fields of every retrieval task
    (None: as each task says); what applied is printed (one line each) and kept in `protocol`.
    """
    if backend not in BACKENDS:
        raise EvalError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "mteb" if mteb_backend.available() else "builtin"
    elif backend == "mteb" and not mteb_backend.available():
        raise EvalError("backend 'mteb' needs the mteb package: pip install 'gecko[mteb]'")
    task_list = as_tasks(tasks, ignore_identical_ids=ignore_identical_ids, strict=strict)
    loaded = [(task, load_task_data(task)) for task in task_list]
    for task, data in loaded:
        if isinstance(data, RetrievalData):
            for line in data.notes(task.name):
                print(f"gecko eval: {line}", file=sys.stderr)
    embedder = model if isinstance(model, Embedder) else Embedder(
        str(model), device=device, cache_dir=cache_dir, batch_size=batch_size, progress=progress
    )
    full = embedder.dim
    dim_list = _check_dims(dims, full)
    style = Prompts(prompts, getattr(embedder.model, "prompts", None))
    meta = None
    if backend == "mteb":
        meta = mteb_backend.model_meta(_model_name(embedder), embedder.identity, full, getattr(embedder.model, "max_seq_length", None))
    results = Results(
        model={**embedder.describe(), "name": _model_name(embedder), "dim": full},
        dims=dim_list,
        prompts=style.mode,
        backend=backend,
        versions=versions(backend),
        tasks=[],
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    for task, data in loaded:
        start = time.monotonic()
        entry = TaskScores(
            task=task.name,
            type=task.type,
            split=task.split,
            path=str(task.path),
            main_metric=task.main_metric,
            mteb_task=task.mteb_name,
            prompts={**style.describe(task), "task": task.prompt if style.mode == "gecko" else None},
            sizes=_sizes(data),
            protocol=data.protocol() if isinstance(data, RetrievalData) else {},
        )
        if backend == "mteb":
            for dim in dim_list:
                scores, result = mteb_backend.score(task, data, embedder.embed, style, None if dim == full else dim, meta)
                entry.scores[dim] = _clean(scores)
                results.mteb_results[(task.name, dim)] = result
        else:
            for dim, scores in _builtin(task, data, embedder, style, dim_list).items():
                scores["main_score"] = scores[task.main_metric]
                entry.scores[dim] = _clean(scores)
        entry.evaluation_time = time.monotonic() - start
        results.tasks.append(entry)
    results.model["encoded_texts"] = embedder.encoded
    return results


def _check_dims(dims, full: int) -> list[int]:
    if dims is None:
        return [full]
    out = []
    for d in dims:
        try:
            d = int(d)
        except (TypeError, ValueError):
            raise EvalError(f"dim {d!r} is not an integer") from None
        if d < 1 or d > full:
            raise EvalError(f"dim {d} is outside 1..{full} (the model's embedding size)")
        if d not in out:
            out.append(d)
    if not out:
        raise EvalError("no dims given")
    return sorted(out, reverse=True)


def _builtin(task: Task, data, embedder: Embedder, style: Prompts, dims: list[int]) -> dict[int, dict]:
    out = {}
    if isinstance(task, RetrievalTask):
        qids = list(data.queries)
        q = embedder.embed([style.query(data.queries[i], task) for i in qids], f"{task.name} queries")
        d = embedder.embed([style.document(p.title, p.text) for p in data.corpus], f"{task.name} documents")
        doc_ids = [p.id for p in data.corpus]
        for dim in dims:
            out[dim] = metrics.retrieval_scores(
                qids, truncate(q, dim), doc_ids, truncate(d, dim), data.qrels, task.k_values, data.ignore_identical_ids
            )
    elif isinstance(task, STSTask):
        e1 = embedder.embed([style.query(t, task) for t in data.sentence1], f"{task.name} texts")
        e2 = embedder.embed([style.query(t, task) for t in data.sentence2], f"{task.name} texts")
        for dim in dims:
            out[dim] = metrics.sts_scores(truncate(e1, dim), truncate(e2, dim), data.scores)
    elif isinstance(task, ClassificationTask):
        draws = metrics.undersample(data.train_labels, task.n_experiments, task.samples_per_label, task.seed)
        union = sorted(set().union(*draws))
        train_full = embedder.embed([style.query(data.train_texts[i], task) for i in union], f"{task.name} train")
        row = {j: p for p, j in enumerate(union)}
        test_full = embedder.embed([style.query(t, task) for t in data.test_texts], f"{task.name} test")
        for dim in dims:
            train_dim = truncate(train_full, dim)
            out[dim] = metrics.classification_scores(
                lambda idx, m=train_dim: m[[row[j] for j in idx]],
                data.train_labels,
                truncate(test_full, dim),
                data.test_labels,
                n_experiments=task.n_experiments,
                samples_per_label=task.samples_per_label,
                max_iter=task.max_iter,
                seed=task.seed,
            )
    else:
        raise EvalError(f"task {task.name}: unknown task type {type(task).__name__}")
    return out


def _sizes(data) -> dict:
    if hasattr(data, "corpus"):
        return {"documents": len(data.corpus), "queries": len(data.queries), "qrels": sum(len(v) for v in data.qrels.values())}
    if hasattr(data, "sentence1"):
        return {"pairs": len(data.scores)}
    return {"train": len(data.train_texts), "test": len(data.test_texts), "labels": len(data.label_names)}


def _clean(value):
    """JSON-ready: numpy scalars to floats, NaN to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if value != value else value
    if isinstance(value, np.integer):
        return int(value)
    return value


def _model_name(embedder: Embedder) -> str:
    if embedder.spec == "default":
        return "sentence-transformers/all-MiniLM-L6-v2"
    return f"local/{Path(str(embedder.path)).name or 'model'}"


def versions(backend: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("gecko", "sentence-transformers", "transformers", "torch", "scikit-learn", "scipy", "numpy", "mteb"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    if backend != "mteb":
        out["mteb"] = None  # not used for scoring, even if installed
    return out


def load_baseline(spec, tasks=(), dims=None, **options) -> Results:
    """A baseline to compare with: a previous run (its results.json or output folder), or a model
    (folder or `default`) evaluated here on the same tasks and dims; `options` go to `evaluate`."""
    from gecko.evaluate.report import is_results, load_results

    if isinstance(spec, Results):
        return spec
    if is_results(spec):
        return load_results(spec)
    return evaluate(spec, tasks, dims, **options)
