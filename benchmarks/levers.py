"""Issue 19's levers, each one `gecko train` run on the committed FRet data, scored by quality.py.

One command trains the named levers' models (skipped when already trained) and prints quality.py's
table for them, paired against `--versus`:

    .venv/bin/python benchmarks/levers.py recipe kl --versus recipe [--split train|test] [--sts stsb,...]

Training rows come from the relabel outputs in `benchmarks/data/` (no LLM work): the parts a lever
names, concatenated, minus the seeds `gecko run`'s label-free check holds out (its default share and
cap), written to OUT/data-PARTS[-RELABEL OPTIONS]/train.jsonl. A lever with relabel options (the
false-negative guard, per-token QL) first rewrites each part from its committed relabel journal
with `gecko relabel OPTIONS` (the LLM is loaded, no pair is scored: the journal's entries carry the
LLM identity, so the transformers bf16 engine they were scored with is asked for). A lever may then
keep a seeded subset of its rows, put another lever's model in the teacher's retriever expert, or
add `--data` sources (SciFact's labelled train claims, scored on test only: they are the dev set).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from quality import DATA

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "data"
CORPUS = DATA / "scifact" / "corpus.jsonl.gz"
SCIFACT_TRAIN = str(DATA / "scifact")  # a BEIR folder: `gecko train` reads its 919 train qrels (809 labelled claims)


@dataclass(frozen=True)
class Part:
    """One committed relabel output and the generated queries it was made from (lines [start, stop))."""

    generated: str
    start: int
    stop: int | None
    relabeled: str


PARTS = {
    "a": Part("scifact-1500x2/generated.jsonl.gz", 0, 1500, "scifact-1500x2/relabeled.jsonl.gz"),
    "b": Part("scifact-1500x2/generated.jsonl.gz", 1500, None, "scifact-1500x2/relabeled-b.jsonl.gz"),
    "c": Part("scifact-rest/generated-c.jsonl.gz", 0, None, "scifact-rest/relabeled-c.jsonl.gz"),
    # SciFact's 809 labelled train claims written as generated queries and relabeled by the same LLM: a human writer
    "h": Part("scifact-train-claims/generated.jsonl.gz", 0, None, "scifact-train-claims/relabeled.jsonl.gz"),
}


@dataclass(frozen=True)
class Lever:
    parts: str  # PARTS keys
    train_args: tuple[str, ...] = ()  # gecko train options besides --data/--corpus/--out/--max-seq-length/--precision
    relabel_args: tuple[str, ...] = ()  # gecko relabel options the parts are rewritten with (no LLM call)
    texts: bool = True  # --corpus: the candidates' texts, so the KL term is on by default (off: the recipe alone)
    precision: str = "bf16"  # explicit, so a row means the same on every CPU; fp32 for the rows measured before bf16
    max_seq_length: str | None = "128"  # tokens per text in training, as the recipe's run (None: the base model's, 256)
    axes: bool = False  # gecko.train.axes' rotation, on in `gecko train` since 2026-12-06 (off: the rows measured before it)
    sample: int | None = None  # only the first query of each of `gecko run`'s sample of this many passages (generate.sample)
    rows: int | None = None  # a seeded random subset of this many of the rows trained on (as many as another lever's)
    teacher_model: str | None = None  # a lever whose model's cosines replace the base retriever's in the teacher's scores
    data: tuple[str, ...] = ()  # more `--data` sources after the parts' rows ("" parts: these alone)


# the KL term as `gecko train` defaulted to until 2026-12-06 (weight 1; teacher per-token QL where the rows
# have it, else QL): given explicitly, where a lever does not set them, so every row means what it meant
EARLIER_DISTILL_WEIGHT = "1"


def earlier_teacher(rows: Path) -> str:
    from gecko.train.config import DataSpec
    from gecko.train.data import load_source
    from gecko.train.run import _teacher_scores

    return "ql-mean" if "ql-mean" in _teacher_scores([load_source(DataSpec(str(rows), corpus=str(CORPUS)))]) else "ql"


FP32 = dict(precision="fp32")
QLRET = ("--distill-teacher", "ql+retriever")  # the teacher QL x the base retriever
QLRET_W4 = (*QLRET, "--distill-weight", "4")  # qlret-w4's: the KL term 4x the Gecko loss
QLRET_W4_T25 = (*QLRET_W4, "--distill-temperature", "2.5")  # the same with QL's expert twice as sharp (default t: 5)


CLAIMS_ROWS = 774  # claims-w4's rows to train on (the 809 claims less the label-free check's holdout)

# the README's rows
LEVERS = {
    "recipe": Lever("ab", texts=False, **FP32),
    "kl": Lever("ab", **FP32),  # the default until 2026-12-03: the listwise KL term, QL teacher at t=5, lists of 6
    "b128": Lever("ab", ("--batch-size", "128"), **FP32),
    "b256": Lever("ab", ("--batch-size", "256")),  # 10 steps under GradCache (bf16: paired against kl-bf16)
    "kl-bf16": Lever("ab"),  # the default trained under CPU bf16 autocast: the reference of the rows below it
    "kl-256": Lever("ab", max_seq_length=None),  # `gecko train`'s own default, the base model's 256 tokens: 98% of SciFact abstracts are longer than 128, 71% than 256
    "guard": Lever("ab", relabel_args=("--false-negative-ratio", "0.95"), **FP32),
    # per-token QL: for one query's candidates it is QL / the query's token count, a per-query temperature;
    # t = 0.42 is t = 5 for the median query (12 Gemma tokens in the committed journals)
    "qltok": Lever("ab", ("--distill-temperature", "0.42"), relabel_args=("--ql-norm", "mean")),
    # `gecko train`'s defaults from 2026-12-03: per-token QL (its default temperature, 0.42) at the base model's 256 tokens
    "qltok-256": Lever("ab", relabel_args=("--ql-norm", "mean"), max_seq_length=None),
    # `gecko train`'s defaults in session 14 (2026-12-06): qltok-256 rotated onto the corpus's principal axes
    "qltok-256-axes": Lever("ab", relabel_args=("--ql-norm", "mean"), max_seq_length=None, axes=True),
    "qlret": Lever("ab", QLRET),
    "qlret-w4": Lever("ab", QLRET_W4),
    "qlret-w8": Lever("ab", (*QLRET, "--distill-weight", "8")),
    # `gecko train`'s defaults since 2026-12-06 (session 15): the KL term at weight 4, teacher QL x retriever, 256 tokens, the axes
    "qlret-w4-256-axes": Lever("ab", QLRET_W4, max_seq_length=None, axes=True),
    "qlret-w4-256-axes-rng1": Lever("ab", (*QLRET_W4, "--seed", "1"), max_seq_length=None, axes=True),  # another seed
    "qlret-w4-rng1": Lever("ab", (*QLRET_W4, "--seed", "1")),  # qlret-w4 with another training seed
    "qlret-w4-lr4": Lever("ab", (*QLRET_W4, "--lr", "4e-5")),  # twice the learning rate
    "qlret-w4-t2.5": Lever("ab", QLRET_W4_T25),
    "qlret-w4-t2.5-rng1": Lever("ab", (*QLRET_W4_T25, "--seed", "1")),
    # a relaxed round-trip filter: only queries whose seed the base retriever ranks in its top 20 (every candidate list's)
    "qlret-w4-seed20": Lever("ab", QLRET_W4, relabel_args=("--max-seed-rank", "20")),
    # both: the sharper teacher on the filtered queries
    "qlret-w4-t2.5-seed20": Lever("ab", QLRET_W4_T25, relabel_args=("--max-seed-rank", "20")),
    # no Matryoshka terms: the loss at 384 dims only, the small dims left to the principal axes' rotation
    "qlret-w4-d384": Lever("ab", (*QLRET_W4, "--dims", "384"), axes=True),
    "qlret-w4-d384-rng1": Lever("ab", (*QLRET_W4, "--dims", "384", "--seed", "1"), axes=True),
    # the Gecko temperature (0.05, sentence-transformers' scale 20) lower: the student's softmax in both terms is sharper,
    # so it matches the teacher's list with smaller moves of its cosines (E5 and BGE train at 0.01-0.02); and higher
    "qlret-w4-tau02": Lever("ab", (*QLRET_W4, "--temperature", "0.02")),
    "qlret-w4-tau10": Lever("ab", (*QLRET_W4, "--temperature", "0.1")),
    "qlret-20": Lever("ab", (*QLRET, "--distill-list", "20")),  # every one of a query's 20 candidates in the KL term
    # relabel's fused score (a sum of weight / rank): median spread over a query's candidates 1.4, QL's 19.9,
    # so t = 0.35 gives the target QL's softness at t = 5 (~4 nats from first to last)
    "fused": Lever("ab", ("--distill-teacher", "fused", "--distill-temperature", "0.35")),
    "full-recipe": Lever("abc", texts=False, **FP32),
    "full": Lever("abc"),
    "full-86": Lever("abc", ("--steps", "86")),  # all the rows at the default's 86 steps: more data, not more steps
    "full-b128": Lever("abc", ("--batch-size", "128")),
    "full-b256": Lever("abc", ("--batch-size", "256")),
    # qlret-w4 on every abstract's queries at one epoch (299 steps): what a `gecko run` over a whole corpus trains
    "full-w4": Lever("abc", QLRET_W4),
    # what `gecko run` trains on by default since session 18: the first query of each of a uniform sample of 3,000
    # abstracts (generate.sample, generate.per_passage 1), qlret-w4's options
    "sample3000-w4": Lever("abc", QLRET_W4, sample=3000),
    # session 19: where the 384-dim ceiling comes from. The writer: SciFact's own labelled train claims with their judged
    # abstracts (the recipe's loss, no negatives), against as many of the LLM's queries trained the same way
    "human809": Lever("", texts=False, data=(SCIFACT_TRAIN,)),
    "synth809": Lever("ab", ("--hard-negatives", "none"), texts=False, rows=809),
    # the same claims relabeled by the LLM (its positives, negatives and teacher scores), qlret-w4's options,
    # against as many of the LLM's own queries
    "claims-w4": Lever("h", QLRET_W4),
    "synth-claims-w4": Lever("ab", QLRET_W4, rows=CLAIMS_ROWS),
    # a stronger retriever expert in the teacher: the student of round 1 (qlret-w4) instead of the base model
    "r2-w4": Lever("ab", QLRET_W4, teacher_model="qlret-w4"),
    "r2-w4-rng1": Lever("ab", (*QLRET_W4, "--seed", "1"), teacher_model="qlret-w4-rng1"),
    # labels, where a user has some: qlret-w4's rows and the 809 labelled claims in one mixture (test only: they are dev)
    "mix-human809": Lever("ab", QLRET_W4, data=(SCIFACT_TRAIN,)),
}


def gecko(*args: str, env: dict[str, str] | None = None, log: Path | None = None) -> None:
    command = [sys.executable, "-m", "gecko.cli", *args]
    print("$ gecko " + " ".join(args), flush=True)
    with open(log, "w") if log else open(os.devnull, "w") as sink:
        done = subprocess.run(command, env={**os.environ, **(env or {})}, stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"gecko {args[0]} failed ({done.returncode}){f': see {log}' if log else ''}")


def gunzip_lines(path: Path, out: Path, start: int = 0, stop: int | None = None) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "rt") as src, open(out, "w") as dst:
        dst.writelines(line for i, line in enumerate(src) if i >= start and (stop is None or i < stop))
    return out


def slug(args: tuple[str, ...]) -> str:
    return "-".join(a.lstrip("-") for a in args)


def rewritten(key: str, relabel_args: tuple[str, ...], work: Path) -> Path:
    """Part `key`'s relabel output rewritten from its journal with other relabel options."""
    part, folder = PARTS[key], work / f"{slug(relabel_args)}-{key}"
    out = folder / "relabeled.jsonl"
    if out.exists():
        return out
    generated = gunzip_lines(COMMITTED / part.generated, folder / "generated.jsonl", part.start, part.stop)
    gunzip_lines(COMMITTED / f"{part.relabeled[:-3]}.journal.gz", folder / "relabeled.jsonl.journal")
    gecko("relabel", "--generated", str(generated), "--corpus", str(CORPUS), "--out", str(out),
          *relabel_args, env={"GECKO_LLM_BACKEND": "transformers", "GECKO_LLM_DTYPE": "bfloat16"},
          log=folder / "relabel.log")
    return out


def keep_sampled(rows: Path, sample: int) -> None:
    """Keep the rows `gecko run` would have generated with generate.sample=SAMPLE and one query per
    passage: each sampled passage's first query (the committed data has two per passage)."""
    from gecko.corpus import load_corpus
    from gecko.generate import select_passages

    seeds = {p.id for p in select_passages(load_corpus(CORPUS)[0], sample=sample)}
    lines = rows.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if (row := json.loads(line))["seed_id"] in seeds and row["id"].endswith(":q0")]
    rows.write_text("".join(kept), encoding="utf-8")
    print(f"{rows.parent.name}: {len(kept)} of {len(lines)} relabeled queries are a sampled passage's first", flush=True)


def with_cosines(lines: list[str], model: Path) -> list[str]:
    """The rows with every candidate's `retriever_score` replaced by `model`'s cosine between the query
    and the candidate, each in training's format: the teacher's retriever expert becomes that model."""
    from gecko.corpus import load_corpus
    from gecko.embed import Embedder
    from gecko.formats import format_document, format_query

    rows = [json.loads(line) for line in lines]
    passages = {p.id: p for p in load_corpus(CORPUS)[0]}
    student = Embedder(str(model), progress=False)
    ids = sorted({c["id"] for row in rows for c in row["candidates"]})
    doc = dict(zip(ids, student.encode([format_document(passages[i].text, passages[i].title) for i in ids])))
    queries = student.encode([format_query(row["query"], row["task"]) for row in rows])
    for row, query in zip(rows, queries):
        for candidate in row["candidates"]:
            candidate["retriever_score"] = float(doc[candidate["id"]] @ query)
    return [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]


def training_rows(lever: Lever, work: Path) -> Path:
    """The rows a lever trains on: `split_rows`', then, in a folder of their own, a seeded subset of them
    (`rows`) and another model as the teacher's retriever expert (`teacher_model`)."""
    split = split_rows(lever, work)
    if not (lever.rows or lever.teacher_model):
        return split
    folder = work / "-".join(filter(None, (split.parent.name, lever.rows and f"r{lever.rows}",
                                           lever.teacher_model and f"cos-{lever.teacher_model}")))
    if (folder / "train.jsonl").exists():
        return folder / "train.jsonl"
    lines = split.read_text(encoding="utf-8").splitlines(keepends=True)
    if lever.rows:
        random.Random(0).shuffle(lines)
        lines = lines[: lever.rows]
    if lever.teacher_model:
        lines = with_cosines(lines, trained(lever.teacher_model, work))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(lines), encoding="utf-8")
    print(f"{folder.name}: {len(lines)} rows to train on", flush=True)
    return folder / "train.jsonl"


def split_rows(lever: Lever, work: Path) -> Path:
    """OUT/data-PARTS[-RELABEL OPTIONS][-sN]/train.jsonl: the parts' rows minus the label-free check's seeds."""
    from gecko.pipeline.config import TrainStage
    from gecko.pipeline.holdout import split_holdout

    folder = work / "-".join(filter(None, ("data", lever.parts, slug(lever.relabel_args), lever.sample and f"s{lever.sample}")))
    if (folder / "train.jsonl").exists():
        return folder / "train.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    everything = folder / "relabeled-all.jsonl"
    with open(everything, "wb") as dst:
        for key in lever.parts:
            if lever.relabel_args:
                with open(rewritten(key, lever.relabel_args, work), "rb") as src:
                    shutil.copyfileobj(src, dst)
            else:
                with gzip.open(COMMITTED / PARTS[key].relabeled, "rb") as src:
                    shutil.copyfileobj(src, dst)
    if lever.sample:
        keep_sampled(everything, lever.sample)
    split = split_holdout(everything, str(CORPUS), folder, TrainStage.holdout, TrainStage.holdout_max)
    print(f"{folder.name}: {split.trained} rows to train on, {split.held_out} held out", flush=True)
    return split.train


def trained(name: str, work: Path) -> Path:
    lever, model = LEVERS[name], work / name / "model"
    if (model / "config.json").exists():
        return model
    rows = training_rows(lever, work) if lever.parts else None
    data = [arg for path in ([str(rows)] if rows else []) + list(lever.data) for arg in ("--data", path)]
    corpus = ("--corpus", str(CORPUS)) if lever.texts else ()
    resume = ("--resume",) if (model / ".train").exists() else ()  # a run killed part way continues from its checkpoint
    length = ("--max-seq-length", lever.max_seq_length) if lever.max_seq_length else ()
    distill = ()
    if lever.texts:
        distill = (*(() if "--distill-weight" in lever.train_args else ("--distill-weight", EARLIER_DISTILL_WEIGHT)),
                   *(() if "--distill-teacher" in lever.train_args else ("--distill-teacher", earlier_teacher(rows))))
    gecko("train", *data, *corpus, "--out", str(model), *length, "--precision", lever.precision,
          *distill, *lever.train_args, *(() if lever.axes else ("--no-principal-axes",)), *resume, log=work / f"{name}.log")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("levers", nargs="+", choices=sorted(LEVERS))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "levers", help="data and models (reused when there)")
    parser.add_argument("--versus", default=None, help="a lever to pair the others against")
    parser.add_argument("--split", choices=["test", "train"], default="train", help="train: SciFact's 809 dev queries")
    parser.add_argument("--sts", default="stsb")
    args = parser.parse_args()
    models = [trained(name, args.out) for name in args.levers]
    command = [sys.executable, str(Path(__file__).with_name("quality.py")), *map(str, models), "--names", ",".join(args.levers),
               "--split", args.split, "--sts", args.sts, *(["--versus", args.versus] if args.versus else [])]
    sys.exit(subprocess.run(command).returncode)


if __name__ == "__main__":
    main()
