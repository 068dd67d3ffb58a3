"""Native vs portable llama.cpp build: prompt-evaluation and generation tokens/s, alternated A/B/A/B.

Unpack each wheel into a folder (`unzip WHEEL -d DIR`) and pass the folders; every round runs
each build in a fresh subprocess (`PYTHONPATH=DIR`), so both see the same machine load.

    .venv/bin/python benchmarks/llama_build.py --build portable=/tmp/portable --build native=/tmp/native [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PROBE = r"""
import gzip, json, time
from pathlib import Path
import llama_cpp
from gecko.llm import GenerationParams
from gecko.llm.llamacpp import ALIGN, MAIN, LlamaCppLLM
llm = LlamaCppLLM(n_threads=int(__import__("sys").argv[1]))
corpus = Path(__import__("sys").argv[2])
text = " ".join(json.loads(l)["text"] for _, l in zip(range(6), gzip.open(corpus, "rt")))
tokens = llm.tokenize(text, bos=True)[:1024]
best = 0.0
for _ in range(3):
    llm.reset()
    start = time.perf_counter()
    llm._decode(tokens, 0, want_logits_from=len(tokens))
    best = max(best, len(tokens) / (time.perf_counter() - start))
start = time.perf_counter()
llm.generate(["Once upon a time"], GenerationParams(max_tokens=64))
print(json.dumps({"prompt": best, "gen": llm.tokens_out / (time.perf_counter() - start),
                  "features": llama_cpp.llama_print_system_info().decode()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--build", action="append", required=True, help="NAME=DIR of an unpacked wheel")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    corpus = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "scifact", "corpus.jsonl.gz")
    builds = [b.split("=", 1) for b in args.build]
    results: dict[str, list[dict]] = {name: [] for name, _ in builds}
    for _ in range(args.rounds):
        for name, folder in builds:
            env = {**os.environ, "PYTHONPATH": folder}
            out = subprocess.run([sys.executable, "-c", PROBE, str(args.threads), corpus], env=env,
                                 capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = builds[0][0]
    base_prompt = max(r["prompt"] for r in results[base])
    print(f"{args.threads} thread(s), best of {args.rounds} rounds, 1,024 SciFact tokens in 64-token chunks\n")
    print("| build | prompt tok/s | generated tok/s | prompt vs " + base + " |")
    print("|---|---|---|---|")
    for name, _ in builds:
        prompt = max(r["prompt"] for r in results[name])
        gen = max(r["gen"] for r in results[name])
        print(f"| {name} | {prompt:.0f} | {gen:.1f} | {prompt / base_prompt:.2f}x |")


if __name__ == "__main__":
    main()
