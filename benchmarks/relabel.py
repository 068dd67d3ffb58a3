"""Relabel speed: (query, passage) pairs/s with both signals, against the naive way, side by side.

Both ways score the same pairs with the packaged Gemma 3 270M (`--llm`: backend) and the same joint
few-shot prompt (passages cut to 200 words), in the same process:
- gecko: `run_relabel` (QL and RC from one pass per candidate via `score_and_label`; the
  few-shot prefix's KV computed once; candidates that share a passage sent together), with an
  empty LLM cache so every pair is computed;
- naive: two separate full prompts per pair (QL prompt, then RC prompt), each evaluated from
  the first token (`naive_score`), on a sample of the same pairs.
Tokens evaluated are counted by the backend (`evaluated_tokens`), so the saving is exact.
The naive way scores fewer pairs (it is ~10x slower); both rates are pairs per second of LLM time.

Two workloads:
- `sample`: `gecko generate` queries for the 40 bundled SciFact abstracts, relabeled against
  those 40 (top-20 of 40: each passage is a candidate of ~20 queries, as when every passage of
  a corpus gets a query);
- `scifact`: SciFact test claims as queries against the full corpus (5,183 abstracts): the
  candidates of different queries rarely overlap, the worst case for sharing.

    .venv/bin/python benchmarks/relabel.py [--workloads sample,scifact] [--queries 10] [--naive-pairs 6]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
SAMPLE = ROOT / "src" / "gecko" / "data" / "sample" / "scifact-sample.jsonl"
TASK = "Given a claim, retrieve documents that support or refute the claim."


def scifact_claims(directory: Path, n: int) -> Path:
    queries = {}
    with gzip.open(SCIFACT / "queries.jsonl.gz", "rt") as handle:
        for line in handle:
            d = json.loads(line)
            queries[d["_id"]] = d["text"]
    seeds: dict[str, str] = {}
    with open(SCIFACT / "qrels.test.tsv") as handle:
        for row in csv.reader(handle, delimiter="\t"):
            if row[0] != "query-id" and row[0] not in seeds and len(seeds) < n:
                seeds[row[0]] = row[1]
    path = directory / "claims.jsonl"
    path.write_text("".join(
        json.dumps({"id": f"claim-{q}", "seed_id": d, "task_type": "fact_checking", "task": TASK, "query": queries[q]}) + "\n"
        for q, d in seeds.items()
    ))
    return path


def sample_queries(directory: Path, llm, n: int) -> Path:
    from gecko.generate import run_generate

    path = directory / "generated.jsonl"
    run_generate(SAMPLE, path, llm, limit=n, progress=False)
    return path


def bench(name: str, generated: Path, corpus: Path, backend, queries: int, naive_pairs: int, work: Path) -> dict:
    from gecko.corpus import load_corpus
    from gecko.llm.cache import CachedLLM, LLMCache
    from gecko.relabel import RelabelConfig, naive_score, run_relabel

    backend.score("Passage: warm-up.\nQuery:", [" a query"])  # kernel set-up and allocations, untimed
    if callable(getattr(backend, "reset", None)):
        backend.reset()  # the gecko way starts without kept KV, as a fresh process does
    llm = CachedLLM(backend, LLMCache(work / f"{name}-cache.sqlite"))  # empty: every pair is computed
    out = work / f"{name}.jsonl"
    before = backend.evaluated_tokens
    summary = run_relabel(generated, corpus, out, llm, RelabelConfig(), limit=queries, progress=False)
    gecko_tokens = backend.evaluated_tokens - before
    llm_s = summary.times["llm_s"]
    pairs = summary.pairs_scored

    # the naive way on the first pairs of the same run, checked against its scores
    passages = {p.id: p for p in load_corpus(corpus)[0]}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    todo = [(r["query"], c) for r in rows for c in r["candidates"]][:naive_pairs]
    before, start = backend.evaluated_tokens, time.perf_counter()
    worst = 0.0
    for query, cand in todo:
        s = naive_score(backend, passages[cand["id"]], query)
        worst = max(worst, abs(s.ql() - cand["ql"]), abs(s.rc() - cand["rc"]))
    naive_s = time.perf_counter() - start
    naive_tokens = backend.evaluated_tokens - before
    gecko_rate, naive_rate = pairs / llm_s, len(todo) / naive_s if todo else float("nan")
    result = {
        "workload": name,
        "queries": summary.queries,
        "pairs": pairs,
        "distinct_passages": len({c["id"] for r in rows for c in r["candidates"]}),
        "gecko_pairs_per_s": round(gecko_rate, 2),
        "gecko_tokens_per_pair": round(gecko_tokens / pairs, 1),
        "naive_pairs": len(todo),
        "naive_pairs_per_s": round(naive_rate, 3),
        "naive_tokens_per_pair": round(naive_tokens / max(len(todo), 1), 1),
        "speedup": round(gecko_rate / naive_rate, 2),
        "token_ratio": round((naive_tokens / max(len(todo), 1)) / (gecko_tokens / pairs), 2),
        "llm": backend.identity,
        # the two ways agree up to llama.cpp's batch-dependent rounding (tests/test_relabel.py)
        "max_score_difference": round(worst, 4),
        "positive_changed_rate": round(summary.positive_changed_rate, 3),
        "relabel_wall_s": summary.wall_s,
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="sample,scifact")
    parser.add_argument("--queries", type=int, default=10, help="generated queries per workload")
    parser.add_argument("--naive-pairs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="LLM threads (default: free cores)")
    parser.add_argument("--llm", default="default", help="backend spec: default, llamacpp:default, transformers:default")
    parser.add_argument("--compare", default="", help="comma-separated backend specs run the gecko way on the same pairs")
    args = parser.parse_args()

    from gecko.llm import load_llm, open_backend

    backend = open_backend(args.llm, n_threads=args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.workloads.split(","):
            if name == "sample":
                # queries come from the shared LLM cache when they were generated before
                generated = sample_queries(work, load_llm(args.llm, n_threads=args.threads), args.queries)
                results.append(bench("sample", generated, SAMPLE, backend, args.queries, args.naive_pairs, work))
                for spec in filter(None, args.compare.split(",")):
                    other = open_backend(spec, n_threads=args.threads)
                    results.append(bench(f"sample ({spec})", generated, SAMPLE, other, args.queries, 0, work))
                    del other
            elif name == "scifact":
                generated = scifact_claims(work, args.queries)
                results.append(bench("scifact", generated, SCIFACT, backend, args.queries, args.naive_pairs, work))
                for spec in filter(None, args.compare.split(",")):
                    other = open_backend(spec, n_threads=args.threads)
                    results.append(bench(f"scifact ({spec})", generated, SCIFACT, other, args.queries, 0, work))
                    del other
            else:
                raise SystemExit(f"unknown workload {name!r}")
    import torch

    threads = args.threads or getattr(backend, "n_threads", None) or torch.get_num_threads()
    print(f"\nLLM: {args.llm} ({backend.identity[:40]}...), threads: {threads}\n")
    print("| workload | queries | pairs | distinct passages | gecko pairs/s | gecko tokens/pair | naive pairs/s | naive tokens/pair | speed-up | token ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['workload']} | {r['queries']} | {r['pairs']} | {r['distinct_passages']} | {r['gecko_pairs_per_s']} | "
              f"{r['gecko_tokens_per_pair']} | {r['naive_pairs_per_s']} | {r['naive_tokens_per_pair']} | "
              f"{r['speedup']}x | {r['token_ratio']}x |")


if __name__ == "__main__":
    main()
