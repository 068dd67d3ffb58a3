"""`gecko demo`: the whole recipe (generate → relabel → train → eval) on the bundled sample with the
packaged models, through `run_pipeline` and the bundled config `gecko/data/demo.yaml`."""

from __future__ import annotations

import dataclasses
import math
from importlib.resources import files
from pathlib import Path
from typing import Iterable

from gecko.pipeline import RunResult, load_config, run_pipeline
from gecko.pipeline.report import max_abs_delta


def demo_config() -> Path:
    return Path(str(files("gecko").joinpath("data/demo.yaml")))


def run_demo(out_dir: str | Path | None = None, overrides: Iterable[str] = (), progress: bool = True) -> RunResult:
    """Run (or finish, or skip) the demo; prints the before/after table and where the report is."""
    config = load_config(demo_config(), overrides)
    if out_dir is not None:
        config = dataclasses.replace(config, run_dir=str(out_dir))
    result = run_pipeline(config, progress=progress)
    print("\nBefore (the packaged all-MiniLM-L6-v2) and after (trained on the demo's generated data), main score ×100:\n")
    print(result.table())
    print("\n" + _how_much(result))
    print(f"\nreport: {result.report}")
    return result


def _how_much(result: RunResult) -> str:
    """Plain words on the size of the change and on how coarse a tiny eval set is."""
    counts = {s.name: s.manifest["counts"] for s in result.stages}
    examples, steps = counts["relabel"]["examples"], counts["train"]["steps"]
    moved = max_abs_delta(result.results, result.baseline)
    text = f"The demo trained on {examples} generated examples for {steps} steps."
    if moved is not None:
        text += (f" The scores moved only a little (at most {moved:.2f} points), as expected from so little training."
                 if moved < 2 else f" The largest change is {moved:.2f} points.")
    retrieval = [t for t in result.results.tasks if t.type == "retrieval" and t.sizes.get("queries")]
    if retrieval:
        t = retrieval[0]
        step = 100 * (1 - 1 / math.log2(3)) / t.sizes["queries"]
        text += (f" With {t.sizes['queries']} queries the numbers are coarse: one relevant document moving from rank 1 "
                 f"to rank 2 changes nDCG@10 by {step:.2f} points.")
    return text + " This demo shows the mechanics of the recipe, not its quality; configs/scifact.yaml is a real run."
