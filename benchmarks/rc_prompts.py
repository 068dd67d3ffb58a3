"""Which relevance-classification (RC) prompt gives the packaged LLM's RC any signal?

Each variant re-ranks the top-10 of the first 30 judged SciFact test queries with `gecko
rerank-eval`'s machinery; printed: nDCG@10 of the retriever and of each order the variant
supports, and the per-query Spearman correlations. Pairs come from the LLM cache when scored before.

    GECKO_LLM_THREADS=1 .venv/bin/python benchmarks/rc_prompts.py [--queries 30] [--top-n 10]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gecko.llm import load_llm
from gecko.relabel import ScoreConfig, run_rerank_eval

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"
VARIANTS = {
    "joint, passage first, 'Relevant: Yes/No' (default)": ScoreConfig(),
    "query first, 'Relevant: Yes/No'": ScoreConfig(prompt_style="rc-query-first"),
    "joint, 'Does the passage answer the query? Yes/No'": ScoreConfig(question="\nDoes the passage answer the query?"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--top-n", type=int, default=10)
    args = parser.parse_args()
    llm = load_llm("default")
    print("| RC prompt | retriever | +RC | +QL | Spearman RC~retriever | Spearman QL~RC |")
    print("|---|---|---|---|---|---|")
    for name, score in VARIANTS.items():
        r = run_rerank_eval(SCIFACT, llm, top_n=args.top_n, limit=args.queries, score=score, progress=False)
        n, s = r.ndcg_at_10, r.spearman
        cells = [f"{100 * n[k]:.2f}" if k in n else "" for k in ("retriever", "+RC", "+QL")]
        cells += [f"{s[k]:+.3f}" if k in s else "" for k in ("RC~retriever", "QL~RC")]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        print(json.dumps({"variant": name, "ndcg_at_10": n, "spearman": s, "pairs": r.pairs}), flush=True)


if __name__ == "__main__":
    main()
