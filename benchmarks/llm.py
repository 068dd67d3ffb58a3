"""LLM backend speed: prompt evaluation and generation tokens/s, and (query, passage) scoring pairs/s.

Scoring uses the shape relabeling needs: a few-shot prefix (~200 tokens) shared by every call,
then a ~150-token SciFact passage and a ~10-token query. The prefix-reuse speed-up is measured
side by side in the same process: the same pairs with the KV cache kept vs reset before each.

    .venv/bin/python benchmarks/llm.py [--backends llamacpp,transformers] [--pairs 20]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"
FEW_SHOT = "".join(
    f"Passage: {p}\nQuery: {q}\n\n"
    for p, q in [
        ("Aspirin irreversibly inhibits cyclooxygenase, which reduces the synthesis of prostaglandins that "
         "mediate pain, fever and inflammation; low doses also reduce platelet aggregation.",
         "how does aspirin reduce inflammation"),
        ("The Treaty of Westphalia of 1648 ended the Thirty Years' War and established the principle of state "
         "sovereignty that still shapes international law in Europe and beyond.",
         "what ended the thirty years war"),
        ("Photosynthesis in the chloroplasts converts light energy into chemical energy stored in glucose, "
         "splitting water and releasing oxygen as a by-product of the light reactions.",
         "which gas do plants release during photosynthesis"),
        ("Python lists are dynamic arrays: appending is amortised constant time because capacity grows "
         "geometrically, while inserting at the front shifts every element.",
         "time complexity of list append in python"),
    ]
)
QUERIES = [" does vitamin D lower fracture risk", " what regulates insulin secretion", " how do T cells kill tumour cells",
           " is obesity linked to cancer", " mechanism of antibiotic resistance"]


def passages(n: int, words: int = 110) -> list[str]:
    out = []
    with gzip.open(SCIFACT / "corpus.jsonl.gz", "rt") as handle:
        for line in handle:
            text = json.loads(line)["text"].split()
            if len(text) >= words:
                out.append(" ".join(text[:words]))
            if len(out) == n:
                return out
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_backend(name: str, llm, n_pairs: int) -> dict:
    """Backends without a persistent KV cache (transformers) have no reset: both columns match."""
    from gecko.llm import GenerationParams

    reset = getattr(llm, "reset", lambda: None)

    docs = passages(n_pairs)
    long_prompt = FEW_SHOT + "\n\n".join(docs[:2])
    prompt_tokens = len(llm.tokenize(long_prompt, bos=True))
    reset()
    prompt_s = timed(lambda: llm.score(long_prompt, [" x"]))

    gen = {}
    gen_s = timed(lambda: gen.update(text=llm.generate(["Once upon a time"], GenerationParams(max_tokens=64))[0]))
    gen_tokens = len(llm.tokenize(gen["text"], bos=False))

    pairs = [(FEW_SHOT + f"Passage: {d}\nQuery:", QUERIES[i % len(QUERIES)]) for i, d in enumerate(docs)]
    passage_tokens = sum(len(llm.tokenize(d, bos=False)) for d in docs) / len(docs)

    def score_all(fresh: bool):
        for prefix, query in pairs:
            if fresh:
                reset()
            llm.score(prefix, [query])

    reset()
    score_all(fresh=False)  # warm-up
    reuse_s = timed(lambda: score_all(fresh=False))
    fresh_s = timed(lambda: score_all(fresh=True))
    return {
        "backend": name,
        "prompt_tok_s": prompt_tokens / prompt_s,
        "gen_tok_s": gen_tokens / gen_s,
        "pairs_s_reuse": len(pairs) / reuse_s,
        "pairs_s_no_reuse": len(pairs) / fresh_s,
        "reuse_speedup": fresh_s / reuse_s,
        "prefix_tokens": len(llm.tokenize(FEW_SHOT, bos=True)),
        "passage_tokens": passage_tokens,
    }


def open_named(name: str, threads: int):
    if name == "llamacpp":
        from gecko.llm.llamacpp import LlamaCppLLM

        return LlamaCppLLM(n_threads=threads)
    if name.startswith("transformers"):
        import torch

        from gecko.llm.hf import TransformersLLM

        torch.set_num_threads(threads)
        return TransformersLLM(dtype="bfloat16" if name.endswith("bf16") else "float32")
    raise SystemExit(f"unknown backend {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backends", default="llamacpp,transformers-fp32,transformers-bf16")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = [bench_backend(name, open_named(name, args.threads), args.pairs) for name in args.backends.split(",")]
    print(f"few-shot prefix {rows[0]['prefix_tokens']} tokens, passages ~{rows[0]['passage_tokens']:.0f} tokens, "
          f"{args.pairs} pairs, {args.threads} threads\n")
    print("| backend | prompt tok/s | generated tok/s | pairs/s (prefix reuse) | pairs/s (no reuse) | reuse speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['prompt_tok_s']:.0f} | {r['gen_tok_s']:.1f} | {r['pairs_s_reuse']:.2f} | "
              f"{r['pairs_s_no_reuse']:.2f} | {r['reuse_speedup']:.2f}x |")


if __name__ == "__main__":
    main()
