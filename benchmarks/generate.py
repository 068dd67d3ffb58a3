"""FRet step 1 throughput: passages/s end to end, against the raw backend on the same prompts.

Side by side in one process, on ~200-word SciFact passages with the default model:
  pipeline  `run_generate` (parsing, retries, journal, final write; a fresh LLM cache)
  raw       `backend.generate` on exactly the prompts the pipeline sent, batched the same way
  single    the same prompts one at a time (no batched decoding), to show what batching buys
The ratio raw/pipeline time says how much the pipeline costs on top of the LLM (goal >= 0.95).

    .venv/bin/python benchmarks/generate.py [--passages 40] [--threads 2] [--llm default] [--compare llamacpp:default]
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

from gecko.generate import GenerateConfig, run_generate
from gecko.llm import CachedLLM, GenerationParams, LLMCache, open_backend
from gecko.llm.engine import choose_engine

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact" / "corpus.jsonl.gz"


class Recorder:
    """Passes calls through and records each generate batch, to replay it on the raw backend."""

    def __init__(self, backend):
        self.backend, self.identity, self.calls = backend, backend.identity, []

    def generate(self, prompts, params):
        self.calls.append((list(prompts), params))
        return self.backend.generate(prompts, params)

    def __getattr__(self, name):  # token counters and the rest come from the backend
        return getattr(self.backend, name)


def backend_options(spec: str, threads: int, batch: int) -> dict:
    """Threads (and llama.cpp's decode batch) for the backend named by `spec`."""
    if spec.startswith("llamacpp") or (spec == "default" and choose_engine().backend == "llamacpp"):
        return {"n_threads": threads, "max_batch": batch}
    if spec.startswith("transformers") or spec == "default":
        return {"n_threads": threads}
    return {}


def reset(backend) -> None:
    if callable(getattr(backend, "reset", None)):
        backend.reset()


def warm_up(backend) -> None:
    """One short call first (kernel set-up, allocations), then no kept KV: timed runs start equal."""
    backend.generate(["Passage: warm-up.\nQuestion:", "Passage: warm-up two.\nQuestion:"], GenerationParams(max_tokens=4))
    reset(backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--passages", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--llm", default="default", help="backend spec: default, llamacpp:default, transformers:default, ...")
    parser.add_argument("--compare", default="", help="comma-separated backend specs to time on the same prompts")
    args = parser.parse_args()
    backend = open_backend(args.llm, **backend_options(args.llm, args.threads, args.batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        with gzip.open(SCIFACT, "rt") as src, corpus.open("w") as dst:
            kept = 0
            for line in src:
                doc = json.loads(line)
                if 170 <= len(doc["text"].split()) <= 240:
                    dst.write(line)
                    kept += 1
                if kept == args.passages:
                    break
        recorder = Recorder(backend)
        llm = CachedLLM(recorder, LLMCache(Path(tmp) / "cache.sqlite"))
        config = GenerateConfig(batch_size=args.batch_size)
        warm_up(backend)
        start = time.perf_counter()
        summary = run_generate(corpus, Path(tmp) / "generated.jsonl", llm, config, progress=False)
        pipeline_s = time.perf_counter() - start

        reset(backend)  # every run starts without kept KV, as the pipeline did
        start = time.perf_counter()
        for prompts, params in recorder.calls:
            backend.generate(prompts, params)
        raw_s = time.perf_counter() - start

        reset(backend)
        start = time.perf_counter()
        for prompts, params in recorder.calls:
            for prompt in prompts:
                backend.generate([prompt], params)
        single_s = time.perf_counter() - start

        compared = []  # other backends on the same prompts, same batches, in this process
        for spec in filter(None, args.compare.split(",")):
            other = open_backend(spec, **backend_options(spec, args.threads, args.batch_size))
            warm_up(other)
            start = time.perf_counter()
            for prompts, params in recorder.calls:
                other.generate(prompts, params)
            compared.append((spec, other.identity, time.perf_counter() - start))
            del other

    n = summary.passages
    print(summary.render() + "\n")
    print(f"{n} passages of 170-240 words, {args.llm} ({backend.identity[:40]}...), {args.threads} threads, batch {args.batch_size}\n")
    print("| run | passages/s | time (s) |")
    print("|---|---|---|")
    print(f"| pipeline (`run_generate`) | {n / pipeline_s:.2f} | {pipeline_s:.1f} |")
    print(f"| raw backend, same batches | {n / raw_s:.2f} | {raw_s:.1f} |")
    print(f"| raw backend, one prompt at a time | {n / single_s:.2f} | {single_s:.1f} |")
    for spec, identity, seconds in compared:
        print(f"| raw `{spec}` ({identity[:24]}...), same batches | {n / seconds:.2f} | {seconds:.1f} |")
    print(f"\nraw / pipeline time: {raw_s / pipeline_s:.3f}; batched speed-up over one at a time: {single_s / raw_s:.2f}x")
    for spec, _, seconds in compared:
        print(f"{args.llm} raw vs `{spec}` raw on the same prompts: {seconds / raw_s:.2f}x")


if __name__ == "__main__":
    main()
