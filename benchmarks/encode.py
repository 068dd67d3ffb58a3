"""Encode throughput: `gecko encode` (`encode_file`) vs `SentenceTransformer.encode`, same model, same texts.

Side by side in one process, on the same loaded model object: a shuffled mix of SciFact passages
(title + text, mostly 150-256 tokens) and SciFact queries (~10-20 tokens), so lengths vary as in a
real corpus. `gecko encode` runs end to end (reads the JSONL, embeds, writes .npy + ids); the
baseline gets the texts already in memory and its default batch size. Runs alternate (ABBA) to
spread machine-load drift over both; the ratio is the median baseline time / median gecko time.

    .venv/bin/python benchmarks/encode.py [--texts 1000] [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gecko.embed import Embedder  # noqa: E402
from gecko.encode import encode_file  # noqa: E402

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def load_texts(n: int, seed: int) -> list[str]:
    with gzip.open(SCIFACT / "corpus.jsonl.gz", "rt") as handle:
        docs = [json.loads(line) for _, line in zip(range(n - n // 2), handle)]
    with gzip.open(SCIFACT / "queries.jsonl.gz", "rt") as handle:
        queries = [json.loads(line)["text"] for _, line in zip(range(n // 2), handle)]
    texts = [(d["title"] + " " + d["text"]).strip() for d in docs] + queries
    random.Random(seed).shuffle(texts)
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="SentenceTransformer.encode batch size (its default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder = Embedder(cache=False)
    model = encoder.model  # the baseline runs on this very object
    texts = load_texts(args.texts, args.seed)
    encoder.encode(texts[:8])  # warm-up
    tokens = np.array([len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=encoder.max_length)["input_ids"]])
    times: dict[str, list[float]] = {"gecko": [], "st": []}
    st_emb = None
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "texts.jsonl"
        src.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
        out = Path(tmp) / "emb.npy"

        def run_gecko():
            start = time.perf_counter()
            encode_file(src, out, encoder, progress=False)
            times["gecko"].append(time.perf_counter() - start)

        def run_st():
            nonlocal st_emb
            start = time.perf_counter()
            st_emb = model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, show_progress_bar=False)
            times["st"].append(time.perf_counter() - start)

        for rep in range(args.reps):
            for run in (run_gecko, run_st) if rep % 2 == 0 else (run_st, run_gecko):
                run()
        diff = float(np.abs(np.load(out) - st_emb).max())
    gecko_s, st_s = statistics.median(times["gecko"]), statistics.median(times["st"])
    n = len(texts)
    print(f"{n} texts (SciFact passages + queries, shuffled): tokens per text median {int(np.median(tokens))}, "
          f"max {tokens.max()}, mean {tokens.mean():.0f}; torch threads {args.threads}; load average {os.getloadavg()[0]:.1f}\n")
    print("| run | texts/s (median) | time (s), each rep |")
    print("|---|---|---|")
    print(f"| `gecko encode` (encode_file: read JSONL, embed, write .npy + ids) | {n / gecko_s:.1f} | "
          f"{', '.join(f'{t:.1f}' for t in times['gecko'])} |")
    print(f"| `SentenceTransformer.encode(batch_size={args.batch_size})`, texts in memory | {n / st_s:.1f} | "
          f"{', '.join(f'{t:.1f}' for t in times['st'])} |")
    print(f"\nratio (sentence-transformers time / gecko time): {st_s / gecko_s:.2f}x; max |difference| of the embeddings: {diff:.1e}")


if __name__ == "__main__":
    main()
