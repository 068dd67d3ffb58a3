"""Training throughput: `gecko train` vs plain sentence-transformers MultipleNegativesRankingLoss.

Same model (the packaged all-MiniLM-L6-v2), same batch size, same max sequence length, the same
formatted texts and the same no-duplicates batches, side by side in one run. Configurations:

* gecko: the `gecko train` loss, full recipe: own hard negatives + same-tower negatives inside
  Matryoshka over 384/256/128/64, length-bucketed forward (`GeckoLoss(bucketed=True)`);
* gecko, per-column forward: the same with `bucketed=False` (sentence-transformers' forward);
* plain ST MNRL: `MultipleNegativesRankingLoss()` (in-batch + hard negatives, one dim).

Workloads (all triples, Gecko formats):
* scifact: 919 SciFact train claims; cited abstract; another abstract (long documents, most cut
  at the max length, so little padding to save);
* mixture: those plus STS-B train pairs scored >= 4 (negative: another STS sentence) and Banking77
  triples (same label; other label; unique id), mixed in batches like the Gecko fine-tuning mixture.

Paired timing (the main numbers): every configuration keeps its own copy of the model and AdamW
and takes one optimizer step on the same batch in turn, rotating who goes first, so a change in
the (shared) machine's load hits all alike; time = loss forward + backward + optimizer step.
Padded tokens per step are counted from the attention masks (what each forward really processes).
End to end (optional): `gecko.train.train` vs `SentenceTransformerTrainer` whole runs, steady-state
examples/s between the first and the last logged step.

    .venv/bin/python benchmarks/train.py --batch-size 32 --max-seq-length 256 --steps 6 \\
        --write-results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HEADING = "## Training throughput: gecko train vs plain sentence-transformers MNRL"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CLAIM_TASK = "Given a claim, find documents that support or refute the claim"
CONFIGS = {
    "gecko": "gecko (own + same-tower negatives, Matryoshka 384/256/128/64, bucketed forward)",
    "gecko-per-column": "gecko, per-column forward (bucketed=False)",
    "plain": "plain ST MultipleNegativesRankingLoss (one dim)",
}


# ---------------------------------------------------------------- data


def write_scifact(data: Path, path: Path, seed: int = 0) -> int:
    """Relabel-format triples from SciFact train qrels: (claim, cited abstract, another abstract)."""
    root = data / "scifact"
    queries = {json.loads(l)["_id"]: json.loads(l)["text"] for l in gzip.open(root / "queries.jsonl.gz", "rt")}
    docs = {}
    for line in gzip.open(root / "corpus.jsonl.gz", "rt"):
        doc = json.loads(line)
        docs[doc["_id"]] = doc
    cited: dict[str, set] = {}
    pairs = []
    for line in (root / "qrels.train.tsv").read_text().splitlines()[1:]:
        qid, did, _ = line.split("\t")
        cited.setdefault(qid, set()).add(did)
        pairs.append((qid, did))
    rng = random.Random(seed)
    ids = sorted(docs)
    with path.open("w") as handle:
        for qid, did in pairs:
            neg = rng.choice(ids)
            while neg in cited[qid]:
                neg = rng.choice(ids)
            handle.write(json.dumps({"task": CLAIM_TASK, "query": queries[qid], "positive": docs[did]["text"],
                                     "positive_title": docs[did]["title"], "negative": docs[neg]["text"],
                                     "negative_title": docs[neg]["title"]}) + "\n")
    return len(pairs)


def write_sts_triples(data: Path, path: Path, limit: int, seed: int = 0) -> int:
    """STS-B train pairs scored >= 4, with another pair's sentence as the negative (symmetric rows)."""
    rows = [line.split("\t") for line in (data / "stsb" / "train.tsv").read_text().splitlines()[1:]]
    good = [(a, b) for a, b, score, _ in rows if float(score) >= 4.0 and a != b]
    rng = random.Random(seed)
    with path.open("w") as handle:
        for i, (a, b) in enumerate(good[:limit]):
            other = good[(i + rng.randrange(1, len(good))) % len(good)][1]
            handle.write(json.dumps({"task": "sentence similarity", "query": a, "positive": b, "negative": other,
                                     "symmetric": True}) + "\n")
    return min(limit, len(good))


def workloads(data: Path, work: Path) -> dict[str, list]:
    from gecko.train import DataSpec

    scifact = work / "scifact-triples.jsonl"
    n = write_scifact(data, scifact)
    sts = work / "stsb-triples.jsonl"
    write_sts_triples(data, sts, n)
    return {
        "scifact": [DataSpec(str(scifact))],
        "mixture": [DataSpec(str(scifact)), DataSpec(str(sts)), DataSpec(str(data / "banking77"), limit=n)],
    }


def examples_of(specs) -> list:
    from gecko.train import load_source

    return [e for spec in specs for e in load_source(spec).examples]


# ---------------------------------------------------------------- paired steps


def padded_tokens(feats: list[dict], batch: int) -> dict[str, int]:
    """Token positions each forward strategy runs (rows x padded width), from the attention masks."""
    lengths = [f["attention_mask"].sum(dim=1).tolist() for f in feats]
    per_column = len(lengths[0]) * max(lengths[0])  # sentence-transformers: the anchor column alone ...
    candidates = [n for col in lengths[1:] for n in col]
    per_column += len(candidates) * max(max(col) for col in lengths[1:])  # ... then candidates merged, padded alike
    flat = sorted((n for col in lengths for n in col), reverse=True)
    bucketed = sum(len(flat[i : i + batch]) * flat[i] for i in range(0, len(flat), batch))
    return {"real": sum(flat), "per_column": per_column, "bucketed": bucketed}


def paired_steps(specs, args) -> tuple[dict[str, list[float]], dict[str, float], int]:
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    from gecko.models import resolve_embedder
    from gecko.train import GeckoLoss

    rows = examples_of(specs)
    dataset = Dataset.from_dict({"anchor": [e.anchor for e in rows], "positive": [e.positive for e in rows],
                                 "negative": [e.negatives[0] for e in rows]})
    device = "cpu" if (args.cpu or not torch.cuda.is_available()) else "cuda"
    base = SentenceTransformer(resolve_embedder("default"), device=device)
    base.max_seq_length = args.max_seq_length
    collate = SentenceTransformerDataCollator(preprocess_fn=base.preprocess)
    sampler = NoDuplicatesBatchSampler(dataset, batch_size=args.batch_size, drop_last=True, generator=torch.Generator(), seed=0)
    batches = [idx for _, idx in zip(range(args.steps + 1), sampler)]

    def features(batch_indices):
        batch = collate([dataset[i] for i in batch_indices])
        out = []
        for column in ("anchor", "positive", "negative"):
            prefix = column + "_"
            feats = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}
            out.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in feats.items()})
        return out

    def setup(kind: str):
        model = copy.deepcopy(base)
        model.train()
        for name, param in model.named_parameters():
            if ".pooler." in name:  # as gecko train does (plain ST never uses it either)
                param.requires_grad_(False)
        if kind == "plain":
            loss = MultipleNegativesRankingLoss(model)
        else:
            inner = GeckoLoss(model, temperature=0.05, same_tower=True, hard_negatives="own", bucketed=kind == "gecko")
            loss = MatryoshkaLoss(model, inner, [384, 256, 128, 64])
        return loss, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.01)

    configs = {kind: setup(kind) for kind in CONFIGS}
    times: dict[str, list[float]] = {kind: [] for kind in configs}
    tokens = {"real": 0, "per_column": 0, "bucketed": 0}
    kinds = list(configs)
    for step, batch_indices in enumerate(batches):
        if step > 0:
            for key, value in padded_tokens(features(batch_indices), args.batch_size).items():
                tokens[key] += value
        for j in range(len(kinds)):
            kind = kinds[(step + j) % len(kinds)]
            loss_fn, optimizer = configs[kind]
            feats = features(batch_indices)  # fresh dicts per run (modules write their outputs into them)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = loss_fn(feats, None)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if step > 0:  # step 0 warms every configuration up
                times[kind].append(time.perf_counter() - start)
        if step > 0:
            print(f"step {step}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in kinds), file=sys.stderr, flush=True)
    steps = len(batches) - 1
    return times, {k: v / steps for k, v in tokens.items()}, len(rows)


# ---------------------------------------------------------------- end to end


def steady_rate(times: dict[int, float], batch: int) -> float:
    steps = sorted(times)
    first, last = steps[0], steps[-1]
    return (last - first) * batch / (times[last] - times[first])


def run_gecko(specs, work: Path, args, bucketed: bool) -> float:
    from gecko.train import TrainConfig, train

    out = work / f"gecko-{time.time_ns()}"
    train(TrainConfig(data=specs, out=str(out), steps=args.e2e_steps, batch_size=args.batch_size,
                      max_seq_length=args.max_seq_length, logging_steps=1, save_steps=10**9, warmup=0, bucketed=bucketed,
                      progress=False, device="cpu" if args.cpu else None))
    times = {}
    for line in (out / "train_log.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "log":
            times[event["step"]] = event["time"]
    return steady_rate(times, args.batch_size)


def run_plain(specs, work: Path, args) -> float:
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from gecko.models import resolve_embedder

    rows = examples_of(specs)  # the very texts gecko trains on
    dataset = Dataset.from_dict({"anchor": [e.anchor for e in rows], "positive": [e.positive for e in rows],
                                 "negative": [e.negatives[0] for e in rows]})
    use_cpu = args.cpu or not torch.cuda.is_available()
    model = SentenceTransformer(resolve_embedder("default"), device="cpu" if use_cpu else None)
    model.max_seq_length = args.max_seq_length
    times: dict[int, float] = {}

    class Clock(TrainerCallback):  # the same hook and clock as gecko's train_log.jsonl events
        def on_log(self, targs, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                times[state.global_step] = time.time()

    targs = SentenceTransformerTrainingArguments(
        output_dir=str(work / f"plain-{time.time_ns()}"), per_device_train_batch_size=args.batch_size,
        max_steps=args.e2e_steps, learning_rate=2e-5, warmup_steps=0, weight_decay=0.01, logging_steps=1,
        logging_first_step=True, save_strategy="no", report_to="none", disable_tqdm=True, seed=0, data_seed=0,
        batch_sampler=BatchSamplers.NO_DUPLICATES, dataloader_drop_last=True, use_cpu=use_cpu,
        bf16=not use_cpu and torch.cuda.is_bf16_supported(),
    )
    trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=dataset,
                                         loss=MultipleNegativesRankingLoss(model), callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # as gecko does: no per-step printing
    trainer.train()
    return steady_rate(times, args.batch_size)


# ---------------------------------------------------------------- report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed paired steps per workload (after one warm-up step)")
    parser.add_argument("--workloads", default="scifact,mixture")
    parser.add_argument("--e2e-steps", type=int, default=0, help="also whole Trainer runs of this many steps (0: skip)")
    parser.add_argument("--e2e-workload", default="mixture")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--cpu", action="store_true", help="CPU even when a GPU is present")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--write-results", type=Path, default=None)
    args = parser.parse_args(argv)

    import logging

    import torch

    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    start = time.time()
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    lines = [
        "| workload | configuration | median s/step | examples/s | vs plain ST (ratio of medians) | vs plain ST (median per-step ratio) | padded tokens/step |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    e2e_lines = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        loads = workloads(args.data, work)
        for name in chosen:
            times, tokens, n = paired_steps(loads[name], args)
            plain = times["plain"]
            for kind, label in CONFIGS.items():
                med = statistics.median(times[kind])
                per_step = statistics.median(p / v for p, v in zip(plain, times[kind]))
                padded = tokens["bucketed" if kind == "gecko" else "per_column"]
                lines.append(f"| {name} ({n} triples) | {label} | {med:.2f} | {args.batch_size / med:.2f} | "
                             f"{statistics.median(plain) / med:.2f}x | {per_step:.2f}x | {padded:,.0f} |")
            notes.append(f"{name}: {tokens['real']:,.0f} real tokens per step; padded: {tokens['per_column']:,.0f} "
                         f"per column (sentence-transformers), {tokens['bucketed']:,.0f} bucketed "
                         f"({tokens['bucketed'] / tokens['per_column']:.2f}x)")
        if args.e2e_steps > 1:
            specs = loads[args.e2e_workload]
            rates = {"gecko": run_gecko(specs, work, args, True), "gecko-per-column": run_gecko(specs, work, args, False),
                     "plain": run_plain(specs, work, args)}
            e2e_lines = ["", f"End to end, {args.e2e_workload} workload: `gecko.train.train` (the whole `gecko train` "
                         f"path: data loading, mixture, sampler, Trainer, checkpoint hooks) vs `SentenceTransformerTrainer`, "
                         f"{args.e2e_steps} steps each, steady-state examples/s; whole runs one after another, so machine "
                         "load moves these more than the paired numbers:", "",
                         "| configuration | examples/s | vs plain ST |", "|---|---|---|"]
            for kind, label in CONFIGS.items():
                e2e_lines.append(f"| {label} | {rates[kind]:.2f} | {rates[kind] / rates['plain']:.2f}x |")
                print(f"end to end: {label}: {rates[kind]:.2f} examples/s", file=sys.stderr, flush=True)
    import sentence_transformers
    import transformers

    device = "cpu" if (args.cpu or not torch.cuda.is_available()) else torch.cuda.get_device_name(0)
    cmd = (f".venv/bin/python benchmarks/train.py --batch-size {args.batch_size} --max-seq-length {args.max_seq_length} "
           f"--steps {args.steps} --workloads {','.join(chosen)} --e2e-steps {args.e2e_steps} --threads {args.threads}"
           + (" --cpu" if args.cpu else "") + " --write-results benchmarks/RESULTS.md")
    body = "\n".join([
        f"Model: packaged all-MiniLM-L6-v2; batch size {args.batch_size}; max sequence length {args.max_seq_length}; the same "
        "texts (Gecko formats) and the same no-duplicates batches for every configuration. Paired timing: each "
        "configuration (own model copy, AdamW lr 2e-5) takes one optimizer step on the same batch in turn, rotating who "
        f"goes first; {args.steps} timed steps after a warm-up step; time = loss forward + backward + optimizer step. "
        "`gecko` is the loss `gecko train` uses: own hard + same-tower negatives, Matryoshka over 384/256/128/64, "
        "length-bucketed forward.",
        "",
        *lines,
        "",
        *[f"- {note}" for note in notes],
        *e2e_lines,
        "",
        f"Device: {device}, torch threads {args.threads} ({platform.machine()}, {os.cpu_count()} cores shared with "
        f"other jobs); torch {torch.__version__}, sentence-transformers {sentence_transformers.__version__}, "
        f"transformers {transformers.__version__}; wall time {time.time() - start:.0f} s.",
        "",
        f"Command: `{cmd}`",
        "",
    ])
    print(body)
    if args.write_results:
        write_section(args.write_results, body)
    return 0


def write_section(path: Path, body: str, heading: str = HEADING) -> None:
    """Insert or replace our section of RESULTS.md, leaving every other section as it is."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    section = f"{heading}\n\n{body}"
    start = text.find(heading)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("" if nxt == -1 else "\n" + text[nxt + 1 :])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
