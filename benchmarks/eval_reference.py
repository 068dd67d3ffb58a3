"""Our evaluation of the packaged all-MiniLM-L6-v2 vs MTEB's published scores (reference_scores.csv).

Runs `gecko.evaluate.evaluate` without prompts (as MTEB runs models without instructions) on the
full local copies of SciFact, STS-B, STS12, STS13, STS14, STS16 and Banking77, and prints ours,
the reference and the difference in points (x100). Embeddings are cached under GECKO_HOME (or
--cache-dir), so a second run only re-scores. Exit status 1 with --check when a task is off by
more than --tolerance points.

    .venv/bin/python benchmarks/eval_reference.py [--tasks scifact,stsb] [--backend auto|mteb|builtin]
        [--check] [--write-results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TASKS = ("scifact", "stsb", "sts12", "sts13", "sts14", "sts16", "banking77")
REFERENCE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
HEADING = "## Evaluation: our scores vs MTEB reference (all-MiniLM-L6-v2)"


def reference_scores(path: Path, model: str = REFERENCE_MODEL) -> dict[str, tuple[str, float, str]]:
    """MTEB task name -> (metric, score 0-1, source) for `model`."""
    out = {}
    with path.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["model"] == model:
                out[row["task"]] = (row["metric"], float(row["score"]), row["source"])
    return out


def compare(results, reference) -> list[dict]:
    rows = []
    for t in results.tasks:
        metric, ref, source = reference.get(t.mteb_task, (t.main_metric, None, ""))
        dim = results.dims[0]
        ours = t.scores[dim].get(metric, t.main_score(dim))
        delta = None if ref is None else 100 * (ours - ref)
        mteb_version = re.search(r"mteb ([0-9.]+)", source)
        rows.append(
            {
                "task": t.task,
                "mteb_task": t.mteb_task,
                "split": t.split,
                "metric": metric,
                "ours": 100 * ours,
                "reference": None if ref is None else 100 * ref,
                "delta": delta,
                "reference_mteb": mteb_version.group(1) if mteb_version else "?",
                "seconds": t.evaluation_time,
            }
        )
    return rows


def markdown(rows, tolerance: float, command: str, results, wall: float) -> str:
    lines = [
        "| task | MTEB task | split | metric | ours | MTEB reference | Δ (points) | within ±%.1f |" % tolerance,
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = "–" if r["reference"] is None else f"{r['reference']:.3f}"
        delta = "–" if r["delta"] is None else f"{r['delta']:+.3f}"
        ok = "–" if r["delta"] is None else ("yes" if abs(r["delta"]) <= tolerance else "**no**")
        lines.append(f"| {r['task']} | {r['mteb_task']} | {r['split']} | {r['metric']} | {r['ours']:.3f} | {ref} | {delta} | {ok} |")
    v = results.versions
    lines += [
        "",
        f"Command: `{command}`",
        "",
        f"Scored by: {results.backend}" + (f" (mteb {v.get('mteb')})" if results.backend == "mteb" else "")
        + f"; sentence-transformers {v.get('sentence-transformers')}, transformers {v.get('transformers')}, "
        f"torch {v.get('torch')}, scikit-learn {v.get('scikit-learn')}; model identity {results.model.get('identity', '')[:12]}; "
        f"prompts off; dim {results.dims[0]}; wall time {wall:.0f} s (embeddings from the cache where present). "
        f"Reference: `reference_scores.csv` (MTEB results files; mteb {', '.join(sorted({r['reference_mteb'] for r in rows}))}).",
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, body: str) -> None:
    """Insert or replace our section of RESULTS.md, leaving every other section as it is."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    section = f"{HEADING}\n\n{body}"
    start = text.find(HEADING)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + len(HEADING))
        text = text[:start] + section + ("" if nxt == -1 else "\n" + text[nxt + 1 :])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run(tasks=TASKS, data: Path = DATA, backend: str = "auto", cache_dir=None, model: str = "default", progress: bool = True):
    from gecko.evaluate import evaluate

    specs = [f"{name}={data / name}" for name in tasks]
    return evaluate(model, specs, None, prompts=False, backend=backend, cache_dir=cache_dir, progress=progress)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--backend", default="auto", choices=("auto", "mteb", "builtin"))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--tolerance", type=float, default=0.5, help="allowed |ours - reference| in points")
    parser.add_argument("--check", action="store_true", help="exit 1 when a task is outside the tolerance")
    parser.add_argument("--write-results", type=Path, default=None, help="put the table into this RESULTS.md section")
    parser.add_argument("--out", type=Path, default=None, help="also write the eval report (JSON, table, plot) here")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    start = time.monotonic()
    results = run(tasks, args.data, args.backend, args.cache_dir)
    wall = time.monotonic() - start
    rows = compare(results, reference_scores(args.data / "reference_scores.csv"))
    command = ".venv/bin/python benchmarks/eval_reference.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    body = markdown(rows, args.tolerance, command.strip(), results, wall)
    print(body)
    if args.out:
        results.write(args.out)
    if args.write_results:
        write_section(args.write_results, body)
    bad = [r["task"] for r in rows if r["delta"] is None or abs(r["delta"]) > args.tolerance]
    if args.check and bad:
        print(f"outside ±{args.tolerance} points: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
