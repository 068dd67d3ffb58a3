"""The cost of the listwise KL term: the recipe's loss vs KL (plain forward) vs KL under GradCache.

Data: relabeled SciFact queries committed in benchmarks/data/scifact-1500x2 with their candidates'
texts from SciFact's corpus, turned into columns exactly as `gecko train --corpus` does (lists of
--list texts: positive, the hard negative, candidates spread over the fused order); the losses
are built by gecko.train.run.make_loss, the same code `gecko train` uses, Matryoshka 384/256/128/64.

Time: paired steps in one process: each configuration has its own copy of the model and AdamW and
takes one optimizer step on the same batch in turn, rotating who goes first, so a change in the
machine's load hits all alike (time = loss forward + backward + optimizer step).
Memory: peak RSS of a child process per configuration taking --memory-steps steps (RSS is per
process, so it cannot be paired), minus the child's RSS before its first step.

    .venv/bin/python benchmarks/distill.py --steps 4 --batch-size 32 --max-seq-length 128
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data" / "scifact-1500x2" / "relabeled.jsonl.gz"
CORPUS = ROOT.parent / "shared" / "data" / "scifact" / "corpus.jsonl.gz"
CONFIGS = {
    "recipe": "the recipe: Gecko loss (own + same-tower negatives)",
    "kl": "recipe + KL term, plain forward (mini_batch_size 0)",
    "kl-cached": "recipe + KL term under GradCache (mini_batch_size 32: the default with the KL term)",
    "recipe-bf16": "the recipe, forward under CPU bf16 autocast (as the Trainer's bf16 runs it; backward outside)",
}


def setup(kind: str, args, work: Path):
    """(model, loss, optimizer, dataset) for one configuration, built as `gecko train` builds them."""
    import torch
    from sentence_transformers import SentenceTransformer

    from gecko.models import resolve_embedder
    from gecko.train import DataSpec, TrainConfig, build_mixture, load_source
    from gecko.train.run import build_datasets, make_loss

    data = work / "relabeled.jsonl"
    if not data.exists():
        with gzip.open(DATA, "rt") as src:
            data.write_text("".join(line for _, line in zip(range(args.examples), src)))
    distill = not kind.startswith("recipe")
    config = TrainConfig(data=[DataSpec(str(data))], out=str(work / "out"), batch_size=args.batch_size,
                         distill_weight=1.0 if distill else 0.0, distill_list=args.list,
                         mini_batch_size=32 if kind == "kl-cached" else 0).resolved(distill)
    source = load_source(DataSpec(str(data), corpus=str(CORPUS) if distill else None))
    dataset, uses_counts, negatives = build_datasets(build_mixture([source]), homogeneous=False, hard_negatives="own",
                                                     seed=0, listwise=args.list if distill else 0, teacher="ql")
    model = SentenceTransformer(resolve_embedder("default"), device="cpu")
    model.max_seq_length = args.max_seq_length
    model.train()
    for name, param in model.named_parameters():
        if ".pooler." in name:  # as gecko train does
            param.requires_grad_(False)
    loss, _ = make_loss(model, config, same_tower=True, hard_negatives="own", uses_counts=uses_counts,
                        dims=[384, 256, 128, 64], homogeneous=False, distill_negatives=negatives if distill else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.01)
    return model, loss, optimizer, dataset


def batches(dataset, args) -> list[list[int]]:
    import torch
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

    sampler = NoDuplicatesBatchSampler(dataset, batch_size=args.batch_size, drop_last=True, valid_label_columns=["label"],
                                       generator=torch.Generator(), seed=0)
    return [idx for _, idx in zip(range(args.steps + 1), sampler)]


def features(model, dataset, indices: list[int]):
    """(one feature dict per text column, the label tensor) of a batch, as the Trainer's collator gives them."""
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

    batch = SentenceTransformerDataCollator(preprocess_fn=model.preprocess)([dataset[i] for i in indices])
    columns = [c for c in dataset.column_names if c != "label"]
    feats = [{k[len(c) + 1:]: v for k, v in batch.items() if k.startswith(c + "_")} for c in columns]
    return feats, batch.get("label")


def step(model, loss_fn, optimizer, dataset, indices, kind: str) -> float:
    """One optimizer step of configuration `kind` (its forward under bf16 autocast for a -bf16 one)."""
    import torch

    feats, labels = features(model, dataset, indices)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind.endswith("-bf16")):
        loss = loss_fn(feats, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def paired(args, work: Path) -> dict[str, list[float]]:
    built = {kind: setup(kind, args, work) for kind in args.configs}
    order = batches(next(iter(built.values()))[3], args)  # the same rows for all (the datasets share their row order)
    kinds = list(built)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for n, indices in enumerate(order):
        for j in range(len(kinds)):
            kind = kinds[(n + j) % len(kinds)]
            model, loss_fn, optimizer, dataset = built[kind]
            took = step(model, loss_fn, optimizer, dataset, indices, kind)
            if n > 0:  # step 0 warms every configuration up
                times[kind].append(took)
        if n > 0:
            print(f"step {n}: " + ", ".join(f"{k} {times[k][-1]:.1f}s" for k in kinds), file=sys.stderr, flush=True)
    return times


def memory_child(kind: str, args, work: Path) -> None:
    model, loss_fn, optimizer, dataset = setup(kind, args, work)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for indices in batches(dataset, args)[: args.memory_steps]:
        step(model, loss_fn, optimizer, dataset, indices, kind)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"kind": kind, "before_kb": before, "peak_kb": peak}))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--list", type=int, default=6, help="texts per query in the KL term")
    parser.add_argument("--examples", type=int, default=400, help="relabeled rows read")
    parser.add_argument("--steps", type=int, default=4, help="timed paired steps (after one warm-up step)")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from: " + ", ".join(CONFIGS))
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    if not args.configs or set(args.configs) - set(CONFIGS):
        parser.error(f"--configs: choose from {', '.join(CONFIGS)}")

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.child:
        memory_child(args.child, args, args.work)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        memory = {}
        for kind in args.configs:
            out = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--child", kind, "--work", str(work)],
                                 check=True, capture_output=True, text=True).stdout
            memory[kind] = json.loads(out.strip().splitlines()[-1])
        times = paired(args, work)
    base = statistics.median(times[args.configs[0]])
    print(f"CPU: {cpu_name()}, {args.threads} torch threads; batch {args.batch_size}, max_seq_length {args.max_seq_length}, "
          f"list {args.list}, {args.steps} paired steps (median), peak RSS after {args.memory_steps} steps in a child process")
    print(f"| configuration | s/step | x {args.configs[0]} | peak RSS GiB | growth in the steps GiB |")
    print("|---|---:|---:|---:|---:|")
    for kind in args.configs:
        label = CONFIGS[kind]
        median = statistics.median(times[kind])
        m = memory[kind]
        print(f"| {label} | {median:.1f} | {median / base:.2f} | {m['peak_kb'] / 2**20:.2f} | "
              f"{(m['peak_kb'] - m['before_kb']) / 2**20:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
