"""The typed configuration of a training run (`TrainConfig`), shared by Python and `gecko train`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gecko.models import DEFAULT
from gecko.options import numbers, option


@dataclass
class DataSpec:
    """One training data source and its mixture weight.

    `weight`: how many times per epoch each of its examples is used on average (1 = once,
    0.5 = a random half, 3 = three times), so sources are sampled in proportion to weight x size.
    `kind`: examples | sts | classification | beir | auto (sniffed from the path).
    `task`: the task description for every row (default: a `task` column; for STS /
    classification / BEIR sources the evaluation prompt of a known dataset name, else
    "sentence similarity" / "classification" / "search result").
    `symmetric`: query format on both sides (default: STS and classification yes; rows of an
    examples file when `task_type` is sentence_similarity or `symmetric` is true).
    """

    path: str
    weight: float = 1.0
    name: str | None = None
    kind: str = "auto"
    task: str | None = None
    symmetric: bool | None = None
    split: str = "train"
    limit: int | None = None  # only the first N source rows
    min_score: float = 4.0  # STS: pairs scored at least this (0-5) are positives
    max_negatives: int | None = None  # examples: keep at most this many negatives per row
    # examples from `gecko relabel`: the corpus their candidate ids come from, which gives the
    # listwise distillation term (TrainConfig.distill_weight) the texts of every candidate
    corpus: str | None = None

    def __post_init__(self):
        self.path = str(self.path)
        if self.weight < 0:
            raise ValueError(f"data {self.path}: weight must be >= 0, got {self.weight}")

    @classmethod
    def parse(cls, spec: str) -> "DataSpec":
        """`PATH`, `PATH:WEIGHT` or `NAME=PATH[:WEIGHT]`, as on the command line."""
        name = None
        head, sep, rest = spec.partition("=")
        if sep and head and "/" not in head and ":" not in head:
            name, spec = head, rest
        path, weight = spec, 1.0
        base, colon, tail = spec.rpartition(":")
        if colon and base:
            try:
                weight = float(tail)
                path = base
            except ValueError:
                pass
        if not path:
            raise ValueError(f"--data {spec!r}: expected PATH[:WEIGHT] or NAME=PATH[:WEIGHT]")
        return cls(path=path, weight=weight, name=name)


# per-candidate scores of `gecko relabel` a listwise teacher can use, and the softmax temperature each
# defaults to. ql sums log-probabilities over the query: on the demo's relabel output the top-1 / top-2
# gap is 6 nats and the top-to-last spread 16 (medians), so 5 gives a soft, not one-hot, target.
# ql-mean is QL per query token, for one query's candidates QL at t x its token count: 0.42 is 5 for
# the median 12-token query; chosen on SciFact dev over ql at 5 (+0.41, CI +0.1..+0.7 at 384 dims) and
# fused (benchmarks/RESULTS.md, "The teacher's score"). fused (relabel's sum of weight / rank) spreads
# 1.4 from first to last against QL's 19.9 (medians), so 0.35 is QL's softness at 5. retriever: the
# base model's cosines at a student's temperature; ql+retriever: QL's and the retriever's product of
# experts, the continuous counterpart of relabel's default fusion (see `gecko.train.data.teacher_score`).
TEACHER_TEMPERATURES = {"ql-mean": 0.42, "ql": 5.0, "fused": 0.35, "retriever": 0.05, "ql+retriever": 5.0}
TEACHERS = tuple(TEACHER_TEMPERATURES)
# the KL term's weight where it is on by default, and its teacher: chosen together on SciFact dev at
# 128 tokens, ql+retriever at 4 over the same teacher at 1 (+0.58, CI +0.1..+1.1 at 384 dims) and over
# per-token QL at 1 (67.47 vs 67.23) (benchmarks/RESULTS.md, "The KL term at weight 4").
DISTILL_WEIGHT = 4.0
DISTILL_TEACHER = "ql+retriever"
DISTILL_MINI_BATCH = 32  # GradCache rows per forward when the KL term is on and mini_batch_size is not given
HARD_NEGATIVES = ("own", "batch", "none")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SOURCES = "[NAME=]PATH[:WEIGHT]"


@dataclass
class StageConfig:
    """The optional pre-finetuning stage: pairs only, in-batch negatives only (no hard negatives,
    no same-tower negatives), before fine-tuning from the same config. Unset fields inherit."""

    data: list[DataSpec] = option(help="repeatable: pre-finetuning stage on pairs, in-batch negatives only, before fine-tuning",
                                  metavar=SOURCES)
    steps: int | None = option(None, "optimizer steps of the pre-finetuning stage (overrides its epochs)")
    epochs: float = option(1.0, "epochs of the pre-finetuning stage")
    batch_size: int | None = option(None, "per device (default: the fine-tuning's)")
    lr: float | None = option(None, "learning rate (default: the fine-tuning's)")


def _default_teacher(scores: frozenset[str]) -> str:
    """DISTILL_TEACHER where every relabeled candidate has its scores, else per-token QL (relabel
    output since 2026-12-03), else QL (every relabel output has it)."""
    needs = {DISTILL_TEACHER: {"ql", "retriever"}, "ql-mean": {"ql-mean"}}
    return next((t for t, need in needs.items() if need <= scores), "ql")


@dataclass
class TrainConfig:
    """Everything a `gecko train` run needs; `train(config)` returns the model folder."""

    data: list[DataSpec] = option(
        help="repeatable: examples .jsonl/.parquet (task, query, positive[, negative]), an STS folder/.tsv, a classification "
        "folder/.csv or a BEIR folder (train qrels); WEIGHT = uses per example per epoch (default 1)", metavar=SOURCES)
    out: str = option(help="output folder: the trained sentence-transformers model, card, loss plot")
    base: str = option(DEFAULT, "model to start from: sentence-transformers folder or default (packaged MiniLM)")
    dims: list[int] | None = option(None, "Matryoshka dims, e.g. 384,256,128,64 (default: full, 256, 128, 64)", type=numbers(int))
    dim_weights: list[float] | None = option(None, "loss weight per Matryoshka dim, e.g. 1,1,1,1 (default: equal)",
                                             type=numbers(float))
    epochs: float = option(1.0, "passes over the data")
    steps: int | None = option(None, "optimizer steps (overrides --epochs)")
    batch_size: int = option(32, "per device")
    lr: float = option(2e-5, "learning rate")
    warmup: float = option(0.1, "warm-up: fraction of steps (< 1) or steps")
    weight_decay: float = option(0.01, "AdamW's weight decay")
    max_seq_length: int | None = option(None, "tokens per text (default: the base model's)")
    temperature: float = option(0.05, "softmax temperature")
    same_tower: bool = option(True, "leave the other queries out of the denominator")
    prompts: bool = option(True, "train on plain texts, without Gecko's task prompts, and save none (as MTEB embeds a prompt-less base)")
    hard_negatives: str = option("own", "own: each query's own (the paper, default); batch: every row's; none: ignore negatives",
                                 choices=HARD_NEGATIVES)
    homogeneous: bool = option(False, "every batch from one data source")
    examples_per_epoch: int | None = option(None, "rescale the weighted mixture to this many")
    mini_batch_size: int | None = option(None, "GradCache: embed this many rows at a time (large batches; 0: off); default: "
                                         f"{DISTILL_MINI_BATCH} when the KL term is on, else off")
    # listwise distillation (gecko.train.loss.ListwiseDistillLoss) over each relabeled query's candidates
    distill_weight: float | None = option(None, "weight of the listwise KL(LLM teacher || student) term over each query's "
                                          f"candidates (0: off); default: {DISTILL_WEIGHT:g} when the data has relabeled "
                                          "candidates and their texts (a relabel file with its --corpus), else off")
    distill_teacher: str | None = option(None, f"the teacher's score; default: {DISTILL_TEACHER} (QL times the base "
                                         "retriever's softmax), else ql-mean (QL per query token), else ql, the first "
                                         "every relabeled candidate has a score for", choices=TEACHERS)
    distill_temperature: float | None = option(None, "the teacher's softmax temperature; default: the teacher's (" +
                                               ", ".join(f"{k} {v:g}" for k, v in TEACHER_TEMPERATURES.items()) + ")")
    distill_list: int = option(6, "texts per query in the KL term")
    principal_axes: bool = option(True, "keep the trained coordinates: no rotation onto the corpus's principal axes "
                                  "(gecko.train.axes; truncated dims score lower without it)")
    axes_documents: int = option(4096, "documents (a seeded sample of the data's corpus, else of its passages) the "
                                 "principal axes are fitted on")
    gather_across_devices: bool = option(True, "under DDP: negatives from this device only, not gathered from every device")
    bucketed: bool = option(True, "no length-sorted chunked forward (see gecko.train.loss)")
    pretrain: StageConfig | None = option(None, cli=False)  # its options are StageConfig's, --pretrain-*
    save_steps: int = option(100, "checkpoint every N steps")
    save_total_limit: int = option(2, "checkpoints kept")
    logging_steps: int = option(10, "log the loss every N steps")
    seed: int = option(0, "seed of the data mixture, its order and the Trainer")
    resume: bool = option(False, "continue the run in --out from its last checkpoint")
    eval_tasks: list[str] = option([], "repeatable: score the trained model with gecko eval after training (numbers go in the "
                                   "card)", flag="--eval-task", metavar="NAME=PATH")
    eval_baseline: bool = option(False, "also score the base model (a delta column in the card)")
    device: str | None = option(None, "cpu or cuda (default: cuda when available)")
    precision: str = option("auto", "auto: bf16 autocast on a GPU that has it or a CPU with bf16 hardware, else fp32", choices=PRECISIONS)
    progress: bool = option(True, "no progress bar")
    keep_checkpoints: bool = option(False, "keep OUT/.train (checkpoints) after finishing")

    def __post_init__(self):
        self.data = [d if isinstance(d, DataSpec) else DataSpec.parse(d) if isinstance(d, str) else DataSpec(**d) for d in self.data]
        if isinstance(self.pretrain, dict):
            self.pretrain = StageConfig(**self.pretrain)
        if self.pretrain is not None:
            self.pretrain.data = [d if isinstance(d, DataSpec) else DataSpec.parse(d) if isinstance(d, str) else DataSpec(**d)
                                  for d in self.pretrain.data]
        if not self.data:
            raise ValueError("no training data (give at least one --data)")
        if self.hard_negatives not in HARD_NEGATIVES:
            raise ValueError(f"hard_negatives must be own, batch or none, got {self.hard_negatives!r}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (in-batch negatives)")
        if self.steps is not None and self.steps < 1:
            raise ValueError("steps must be positive")
        if not self.temperature > 0:
            raise ValueError("temperature must be positive")
        if self.dims is not None:
            self.dims = sorted({int(d) for d in self.dims}, reverse=True)
            if not self.dims or self.dims[-1] <= 0:
                raise ValueError(f"dims must be positive integers, got {self.dims}")
            if self.dim_weights is not None and len(self.dim_weights) != len(self.dims):
                raise ValueError("dim_weights must have one weight per dim")
        if self.axes_documents < 1:
            raise ValueError("axes_documents must be positive")
        if (self.distill_weight or 0) < 0 or self.distill_teacher not in (None, *TEACHERS) or self.distill_list < 2:
            raise ValueError(f"distill: weight must be >= 0, teacher one of {', '.join(TEACHERS)}, list at least 2")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        self.out = str(self.out)

    def resolved(self, has_candidates: bool, teacher_scores: frozenset[str] = frozenset()) -> "TrainConfig":
        """The automatic settings made concrete for data with (or without) relabeled candidates whose
        scores are `teacher_scores`: the KL term on at DISTILL_WEIGHT where it can be (on 2,776 SciFact
        queries it beat the recipe on dev at 384 and 256 dims: benchmarks/RESULTS.md, "Twice the
        data"), its teacher and temperature, and then GradCache, because the plain KL forward keeps
        the graphs of batch x (list + 1) texts (9.9 vs 2.9 GB peak RSS at batch 32, 128 tokens: "The
        KL term's cost")."""
        automatic = DISTILL_WEIGHT if has_candidates and not self.homogeneous else 0.0
        weight = self.distill_weight if self.distill_weight is not None else automatic
        mini = self.mini_batch_size if self.mini_batch_size is not None else (DISTILL_MINI_BATCH if weight else 0)
        teacher = self.distill_teacher or _default_teacher(teacher_scores)
        temperature = self.distill_temperature if self.distill_temperature is not None else TEACHER_TEMPERATURES[teacher]
        return dataclasses.replace(self, distill_weight=weight, mini_batch_size=mini or None, distill_teacher=teacher,
                                   distill_temperature=temperature)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def fingerprint(self) -> dict[str, Any]:
        """What must match for `--resume` to continue a run (not: resume, progress, eval, checkpoints)."""
        data = self.to_dict()
        for key in ("resume", "progress", "eval_tasks", "eval_baseline", "keep_checkpoints", "save_steps",
                    "save_total_limit", "logging_steps", "device", "out"):
            data.pop(key, None)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config field(s): {', '.join(unknown)}")
        missing = [name for name in ("data", "out") if name not in data]
        if missing:
            raise ValueError(f"training config needs {' and '.join(missing)}")
        return cls(**data)

    @staticmethod
    def read_file(path) -> dict:
        """The fields in a JSON or YAML file (possibly partial: the command line adds the rest)."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of TrainConfig fields")
        return data

    @classmethod
    def load(cls, path) -> "TrainConfig":
        """A config from a JSON or YAML file (the fields of TrainConfig)."""
        return cls.from_dict(cls.read_file(path))
