"""A run's results (`Results`, one `TaskScores` per task) and what it leaves in its output folder.

`write_report(results, out, baseline)` writes, each atomically (temp file + os.replace):
* `results.json`: model, dims, prompts, backend, versions and per task the split, main metric,
  prompts used and every score per dim (flat MTEB score dicts, 0-1 scale);
* `mteb/dim{D}/{Task}.json`: one MTEB `TaskResult` file per task and dim (loadable by mteb);
* `results.md`: the main scores x100 per task and dim, with a delta column per dim vs the baseline;
* `score_vs_dim.png`: main score against dimension, one line per task (baseline dashed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gecko.evaluate.tasks import EvalError
from gecko.journal import pyplot, save_figure_atomic, write_text_atomic

PROMPT_WORDS = {
    "model": "as the model says (its saved prompts; plain texts where it saves none, as MTEB scores it)",
    "gecko": "the Gecko formats for every text (task: … | query: …, title: … | text: …)",
    "none": "off (plain texts, MTEB style)",
}


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
        head = ("task", "type", "split", "path", "main_metric", "mteb_task", "prompts", "sizes")
        return {**{k: getattr(self, k) for k in head}, **({"protocol": self.protocol} if self.protocol else {}),
                "evaluation_time": round(self.evaluation_time, 3),
                "main_score": {str(d): s.get("main_score") for d, s in self.scores.items()},
                "scores": {str(d): s for d, s in self.scores.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "TaskScores":
        defaults = {"type": "", "split": "test", "path": "", "main_metric": "main_score", "mteb_task": None,
                    "prompts": {}, "sizes": {}, "evaluation_time": 0.0, "protocol": {}}
        return cls(task=data["task"], scores={int(d): s for d, s in data.get("scores", {}).items()},
                   **{k: data.get(k, v) for k, v in defaults.items()})


@dataclass
class Results:
    """A run: the model, the dims, how it was scored, and each task's scores."""

    model: dict
    dims: list[int]
    prompts: str  # the `gecko.formats.Prompts` mode: model | gecko | none
    backend: str
    versions: dict
    tasks: list[TaskScores]
    created: str = ""
    mteb_results: dict = field(default_factory=dict, repr=False)  # (task, dim) -> mteb TaskResult, when scored by mteb

    def task(self, name: str) -> TaskScores | None:
        return next((t for t in self.tasks if t.task == name), None)

    def to_dict(self) -> dict:
        return {"format": "gecko-eval/1", "created": self.created,
                **{k: getattr(self, k) for k in ("model", "dims", "prompts", "backend", "versions")},
                "tasks": [t.to_dict() for t in self.tasks]}

    @classmethod
    def from_dict(cls, data: dict) -> "Results":
        if "tasks" not in data or "dims" not in data:
            raise EvalError("not a gecko eval results file (no 'tasks' and 'dims')")
        return cls(model=data.get("model", {}), dims=[int(d) for d in data["dims"]],
                   prompts={True: "gecko", False: "none"}.get(data.get("prompts", True), data.get("prompts")),
                   backend=data.get("backend", ""), versions=data.get("versions", {}),
                   tasks=[TaskScores.from_dict(t) for t in data["tasks"]], created=data.get("created", ""))

    def table(self, baseline: "Results | None" = None) -> str:
        return markdown_table(self, baseline)

    def write(self, out_dir, baseline: "Results | None" = None) -> dict[str, Path]:
        return write_report(self, out_dir, baseline)


def load_results(path) -> Results:
    """A run's results from its `results.json` or its output folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise EvalError(f"{path}: no such results file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvalError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    try:
        return Results.from_dict(data)
    except (EvalError, KeyError, TypeError, ValueError) as err:
        raise EvalError(f"{path}: {err}") from None


def is_results(path) -> bool:
    path = Path(path)
    return path.suffix.lower() == ".json" or (path / "results.json").is_file()


def _name(results: Results) -> str:
    spec = results.model.get("spec", "?")
    return "default (all-MiniLM-L6-v2)" if spec == "default" else str(spec)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _delta(ours: float | None, base: float | None) -> str:
    return "–" if ours is None or base is None else f"{100 * (ours - base):+.2f}"


def _mean(values: list[float | None]) -> float | None:
    return sum(values) / len(values) if all(v is not None for v in values) else None


def markdown_table(results: Results, baseline: Results | None = None) -> str:
    dims = results.dims
    bases = {t.task: baseline.task(t.task) if baseline is not None else None for t in results.tasks}

    def row(cells: list[str], ours, theirs) -> str:
        """`cells`, then each dim's `ours(dim)` and, with a baseline, its delta to `theirs(dim)`."""
        for d in dims:
            cells += [_fmt(ours(d))] + ([_delta(ours(d), theirs(d))] if baseline is not None else [])
        return "| " + " | ".join(cells) + " |"

    head = ["task", "split", "metric"]
    for d in dims:
        head += [str(d), f"Δ{d}"] if baseline is not None else [str(d)]
    lines = [
        f"# gecko eval: {_name(results)}",
        "",
        f"- model: `{results.model.get('path', '?')}` (identity {str(results.model.get('identity', '?'))[:12]})",
        f"- prompts: {PROMPT_WORDS.get(results.prompts, results.prompts)}; scored by: {results.backend}"
        + (f" {results.versions.get('mteb')}" if results.backend == "mteb" else ""),
    ]
    if baseline is not None:
        words = PROMPT_WORDS.get(baseline.prompts, baseline.prompts)
        lines.append(f"- baseline: `{_name(baseline)}` (prompts: {words}); Δ = ours − baseline, points")
    lines += ["- scores ×100 (main metric of each task)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in results.tasks:
        base = bases[t.task]
        theirs = base.main_score if base else lambda d: None
        lines.append(row([t.task, t.split, t.main_metric], t.main_score, theirs))
    if len(results.tasks) > 1:
        lines.append(row(["average", "", ""], lambda d: _mean([t.main_score(d) for t in results.tasks]),
                         lambda d: _mean([b.main_score(d) if b else None for b in bases.values()])))
    return "\n".join(lines) + "\n"


def plot(results: Results, path, baseline: Results | None = None) -> Path:
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    dims = sorted(results.dims)
    for i, t in enumerate(results.tasks):
        color = f"C{i % 10}"
        xs = [d for d in dims if t.main_score(d) is not None]
        ax.plot(xs, [100 * t.main_score(d) for d in xs], marker="o", color=color, label=f"{t.task} ({t.main_metric})")
        base = baseline.task(t.task) if baseline is not None else None
        if base is not None:
            bx = [d for d in sorted(baseline.dims) if base.main_score(d) is not None]
            if bx:
                ax.plot(bx, [100 * base.main_score(d) for d in bx], linestyle="--", marker=".", color=color, alpha=0.6,
                        label=f"{t.task} baseline")
    if len(dims) > 1 and dims[-1] / dims[0] >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(dims)
    ax.set_xticklabels([str(d) for d in dims])
    ax.set_xlabel("embedding dimension (Matryoshka truncation)")
    ax.set_ylabel("main score ×100")
    ax.set_title(f"{_name(results)}: score vs dimension" + (" (no prompts)" if results.prompts == "none" else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=120)


def mteb_task_result(results: Results, t: TaskScores, dim: int) -> dict:
    """The MTEB `TaskResult` JSON of one task at one dim (from mteb itself when it scored the run)."""
    result = results.mteb_results.get((t.task, dim))
    if result is not None:
        data = result.model_dump(mode="json")
        data["date"] = result.date.timestamp() if result.date else None
        return data
    return {"dataset_revision": "local", "task_name": t.mteb_task or f"gecko-{t.task}", "mteb_version": None,
            "scores": {t.split: [{**t.scores[dim], "hf_subset": "default", "languages": ["eng-Latn"]}]},
            "evaluation_time": t.evaluation_time, "kg_co2_emissions": None}


def write_report(results: Results, out_dir, baseline: Results | None = None) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = results.to_dict()
    if baseline is not None:
        main = {t.task: {str(d): t.main_score(d) for d in baseline.dims} for t in baseline.tasks}
        data["baseline"] = {"model": baseline.model, "prompts": baseline.prompts, "main_score": main}
    paths = {"json": write_text_atomic(out / "results.json", json.dumps(data, indent=2, ensure_ascii=False) + "\n")}
    for t in results.tasks:
        for dim in t.scores:
            name = (t.mteb_task or f"gecko-{t.task}") + ".json"
            write_text_atomic(out / "mteb" / f"dim{dim}" / name, json.dumps(mteb_task_result(results, t, dim), indent=2) + "\n")
    paths["mteb"] = out / "mteb"
    paths["markdown"] = write_text_atomic(out / "results.md", markdown_table(results, baseline))
    paths["plot"] = plot(results, out / "score_vs_dim.png", baseline)
    return paths
