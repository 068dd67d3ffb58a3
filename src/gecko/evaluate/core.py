"""`evaluate(model, tasks, dims)`: MTEB-style scores of an embedder at each Matryoshka dimension."""

from __future__ import annotations

import dataclasses
import datetime
import platform
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from gecko.embed import EmbedError, Embedder
from gecko.evaluate import mteb_backend
from gecko.evaluate.report import Results, TaskScores, is_results, load_results
from gecko.evaluate.tasks import EvalError, Task, load_task_data, parse_task_spec, resolve_task
from gecko.formats import Prompts

BACKENDS = ("auto", "mteb", "builtin")


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
    out = [dataclasses.replace(t, **given) if given.keys() <= {f.name for f in dataclasses.fields(t)} else t for t in out]
    if not out:
        raise EvalError("no tasks given")
    names = [t.name for t in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EvalError(f"task name(s) given twice: {', '.join(dupes)}")
    return out


def evaluate(model="default", tasks: Iterable = (), dims: Iterable[int] | None = None, *,
             prompts: str | bool = "model", backend: str = "auto", cache_dir=None, device: str | None = None,
             batch_size: int = 64, progress: bool = True, ignore_identical_ids: bool | None = None,
             strict: bool | None = None) -> Results:
    """Score `model` on `tasks` at each of `dims` (default: its full dimension).

    `model`: an embedder folder, `default` (the packaged all-MiniLM-L6-v2) or a `gecko.embed.Embedder`
    (`batch_size`: the most texts it runs at once). `prompts` (see `gecko.formats.Prompts`): `model` (default) embeds as the model says to use it (its saved
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
        for line in data.notes(task.name):
            print(f"gecko eval: {line}", file=sys.stderr)
    try:
        embedder = model if isinstance(model, Embedder) else Embedder(str(model), device=device, cache_dir=cache_dir,
                                                                      max_batch=batch_size, progress=progress)
        style = Prompts(prompts, embedder.prompts)
    except (EmbedError, ValueError) as err:
        raise EvalError(str(err)) from None
    full = embedder.dim
    dim_list = _check_dims(dims, full)
    meta = None
    if backend == "mteb":
        meta = mteb_backend.model_meta(_model_name(embedder), embedder.identity, full, embedder.model.max_seq_length)
    results = Results(model={**embedder.describe(), "name": _model_name(embedder)}, dims=dim_list, prompts=style.mode,
                      backend=backend, versions=versions(backend), tasks=[],
                      created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    for task, data in loaded:
        start = time.monotonic()
        entry = TaskScores(task=task.name, type=task.type, split=task.split, path=str(task.path),
                           main_metric=task.main_metric, mteb_task=task.mteb_name,
                           prompts={**style.describe(task), "task": task.prompt if style.mode == "gecko" else None},
                           sizes=data.sizes(), protocol=data.protocol())
        if backend == "mteb":
            for dim in dim_list:
                scores, result = mteb_backend.score(task, data, embedder.embed, style, None if dim == full else dim, meta)
                entry.scores[dim] = _clean(scores)
                results.mteb_results[(task.name, dim)] = result
        else:
            for dim, scores in task.score(data, embedder.embed, style, dim_list).items():
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
    if isinstance(spec, Results):
        return spec
    if is_results(spec):
        return load_results(spec)
    return evaluate(spec, tasks, dims, **options)
