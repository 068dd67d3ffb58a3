"""The quality table: SciFact nDCG@10 before/after at every dim with paired-bootstrap CIs, and STS.

Takes trained models (a `gecko run` folder, its `train/model` is used, or a model folder), embeds
SciFact's queries (test, or `--split train` for the 809 dev queries that settings are chosen on)
and corpus with each model and with the base model, scores every judged query, and prints per
model and dim: nDCG@10, the change against the base with a 95% paired-bootstrap interval over the
queries, and STS-B Spearman (test, or dev with `--split train`). `--prompts model` (default)
compares as users will use the models: each trained model as its card says (its saved prompts),
the base as MTEB scores it (plain texts); `--prompts gecko` gives both the Gecko formats (the
same-prompts column). Embeddings come from gecko's cache, so rows already scored cost nothing.

    .venv/bin/python benchmarks/quality.py runs/sf2 runs/sf2-kl [--names recipe,kl] [--versus recipe]
        [--prompts model|gecko] [--split test|train] [--sts stsb,sts12,...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DIMS = (384, 256, 128, 64)


def model_folder(path: Path) -> str:
    return str(path / "train" / "model") if (path / "train" / "model").is_dir() else str(path)


def per_query_ndcg(model: str, data, task, mode: str) -> dict[int, list[float]]:
    from gecko.embed import Embedder, truncate
    from gecko.evaluate.metrics import exact_ranking, ranking_per_query
    from gecko.formats import Prompts

    embedder = Embedder(model, progress=False)
    style = Prompts(mode, embedder.prompts)
    qids = list(data.queries)
    q = embedder.embed([style.query(data.queries[i], task) for i in qids])
    d = embedder.embed([style.document(p.title, p.text) for p in data.corpus])
    ids = [p.id for p in data.corpus]
    return {dim: ranking_per_query(exact_ranking(qids, truncate(q, dim), ids, truncate(d, dim), 10), data.qrels, (10,))["ndcg_at_10"]
            for dim in DIMS}


def sts_scores(model: str, names: list[str], split: str, mode: str) -> dict[str, dict[int, float]]:
    from gecko.evaluate import evaluate
    from gecko.evaluate.tasks import resolve_task

    tasks = [resolve_task(name, DATA / name, split=split if name == "stsb" else None) for name in names]
    results = evaluate(model, tasks, list(DIMS), prompts=mode, backend="builtin", progress=False)
    return {name: {d: results.task(name).main_score(d) for d in DIMS} for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--names", default=None, help="comma-separated labels for the runs")
    parser.add_argument("--versus", default=None, help="also print each run's Δ against this run (a name), paired over the queries")
    parser.add_argument("--prompts", choices=["model", "gecko"], default="model")
    parser.add_argument("--split", choices=["test", "train"], default="test", help="train: SciFact's train queries and STS-B dev")
    parser.add_argument("--sts", default="stsb", help="comma-separated STS / classification sets in ../shared/data")
    args = parser.parse_args()
    names = args.names.split(",") if args.names else [r.name for r in args.runs]
    if len(names) != len(args.runs):
        parser.error(f"--names gives {len(names)} labels for {len(args.runs)} runs")
    if args.versus and args.versus not in names:
        parser.error(f"--versus {args.versus!r} is not one of the runs' names: {', '.join(names)}")

    from gecko.evaluate.metrics import paired_bootstrap_ci
    from gecko.evaluate.tasks import load_task_data, resolve_task

    task = resolve_task("scifact", DATA / "scifact", split=args.split)
    data = load_task_data(task)
    sts_names = [n for n in args.sts.split(",") if n]
    sts_split = "dev" if args.split == "train" else "test"
    base = per_query_ndcg("default", data, task, "none" if args.prompts == "model" else "gecko")
    base_sts = sts_scores("default", sts_names, sts_split, "none" if args.prompts == "model" else "gecko")
    mean = lambda xs: 100 * sum(xs) / len(xs)  # noqa: E731
    print("| model | " + " | ".join(f"nDCG@10 {d} (Δ, 95% CI)" for d in DIMS) + " | "
          + " | ".join(f"{n} {d}" for n in sts_names for d in DIMS) + " |")
    print("|---" * (1 + len(DIMS) * (1 + len(sts_names))) + "|")
    print("| base (all-MiniLM-L6-v2) | " + " | ".join(f"{mean(base[d]):.2f}" for d in DIMS) + " | "
          + " | ".join(f"{100 * base_sts[n][d]:.2f}" for n in sts_names for d in DIMS) + " |")
    scored = {}
    for name, run in zip(names, args.runs):
        model = model_folder(run)
        ours = scored[name] = per_query_ndcg(model, data, task, args.prompts)
        sts = sts_scores(model, sts_names, sts_split, args.prompts)
        cells = []
        for d in DIMS:
            lo, hi = paired_bootstrap_ci(ours[d], base[d])
            cells.append(f"{mean(ours[d]):.2f} ({mean(ours[d]) - mean(base[d]):+.2f}; {100 * lo:+.1f}..{100 * hi:+.1f})")
        print(f"| {name} | " + " | ".join(cells) + " | "
              + " | ".join(f"{100 * sts[n][d]:.2f} ({100 * (sts[n][d] - base_sts[n][d]):+.2f})" for n in sts_names for d in DIMS) + " |")
    how = ("each model as its card says, the base as MTEB scores it (plain texts)" if args.prompts == "model"
           else "both with the Gecko prompts")
    print(f"\n{len(base[DIMS[0]])} SciFact {args.split} queries, STS on {sts_split}; {how}; "
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
