"""Issue 7's quality table: SciFact nDCG@10 before/after at every dim, with paired-bootstrap CIs, for runs.

Reads finished `gecko run` folders (each with `train/model` and `eval/`), embeds SciFact's test
queries and corpus with each trained model and the base model exactly as `gecko eval` does (same
texts, same embedding cache, so nothing is encoded again after the runs' own eval), scores every
judged query, and prints per run and dim: nDCG@10, the change against the base model with a 95%
paired-bootstrap interval over the 300 test queries, and STS-B Spearman from the run's eval.

    .venv/bin/python benchmarks/quality.py runs/q/main runs/q/p1-none ... [--names p1+pN,p1+none,...] [--versus p1+pN]
"""

from __future__ import annotations

import argparse
from pathlib import Path

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"
DIMS = (384, 256, 128, 64)


def per_query_ndcg(model: str, data, task) -> dict[int, list[float]]:
    from gecko.evaluate.encoder import Embedder, Prompts, truncate
    from gecko.evaluate.metrics import exact_ranking, ranking_per_query

    embedder, style = Embedder(model, progress=False), Prompts(True)
    qids = list(data.queries)
    q = embedder.embed([style.query(data.queries[i], task) for i in qids])
    d = embedder.embed([style.document(p.title, p.text) for p in data.corpus])
    ids = [p.id for p in data.corpus]
    return {dim: ranking_per_query(exact_ranking(qids, truncate(q, dim), ids, truncate(d, dim), 10), data.qrels, (10,))["ndcg_at_10"] for dim in DIMS}


def stsb(run: Path, which: str) -> dict[int, float]:
    """STS-B test Spearman (cosine) per dim, from the run's own eval (`eval/base` or `eval/trained`)."""
    from gecko.evaluate import load_results

    return {dim: load_results(run / "eval" / which).task("stsb").main_score(dim) for dim in DIMS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--names", default=None, help="comma-separated labels for the runs")
    parser.add_argument("--versus", default=None, help="also print each run's Δ against this run (a name), paired over the queries")
    args = parser.parse_args()
    names = args.names.split(",") if args.names else [r.name for r in args.runs]
    if len(names) != len(args.runs):
        parser.error(f"--names gives {len(names)} labels for {len(args.runs)} runs")
    if args.versus and args.versus not in names:
        parser.error(f"--versus {args.versus!r} is not one of the runs' names: {', '.join(names)}")

    from gecko.evaluate.metrics import paired_bootstrap_ci
    from gecko.evaluate.tasks import load_task_data, resolve_task

    task = resolve_task("scifact", SCIFACT)
    data = load_task_data(task)
    base = per_query_ndcg("default", data, task)
    base_sts = stsb(args.runs[0], "base")
    header = "| run | " + " | ".join(f"nDCG@10 {d} (Δ, 95% CI)" for d in DIMS) + " | " + " | ".join(f"STS-B {d}" for d in DIMS) + " |"
    print(header)
    print("|---" * (1 + 2 * len(DIMS)) + "|")
    mean = lambda xs: 100 * sum(xs) / len(xs)  # noqa: E731
    print("| base (all-MiniLM-L6-v2) | " + " | ".join(f"{mean(base[d]):.2f}" for d in DIMS) + " | "
          + " | ".join(f"{100 * base_sts[d]:.2f}" for d in DIMS) + " |")
    scored = {}
    for name, run in zip(names, args.runs):
        ours = scored[name] = per_query_ndcg(str(run / "train" / "model"), data, task)
        sts = stsb(run, "trained")
        cells = []
        for d in DIMS:
            lo, hi = paired_bootstrap_ci(ours[d], base[d])
            cells.append(f"{mean(ours[d]):.2f} ({mean(ours[d]) - mean(base[d]):+.2f}; {100 * lo:+.1f}..{100 * hi:+.1f})")
        print(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(f"{100 * sts[d]:.2f} ({100 * (sts[d] - base_sts[d]):+.2f})" for d in DIMS) + " |")
    print(f"\n{len(base[DIMS[0]])} SciFact test queries; Δ against the base model with the same prompts; "
          "CI: 10,000 paired bootstrap resamples of the queries.")
    if args.versus:
        ref = scored[args.versus]
        print(f"\n| run | " + " | ".join(f"Δ nDCG@10 {d} vs {args.versus} (95% CI)" for d in DIMS) + " |")
        print("|---" * (1 + len(DIMS)) + "|")
        for name, ours in scored.items():
            if name != args.versus:
                cis = [paired_bootstrap_ci(ours[d], ref[d]) for d in DIMS]
                print(f"| {name} | " + " | ".join(f"{mean(ours[d]) - mean(ref[d]):+.2f} ({100 * lo:+.1f}..{100 * hi:+.1f})" for d, (lo, hi) in zip(DIMS, cis)) + " |")


if __name__ == "__main__":
    main()
