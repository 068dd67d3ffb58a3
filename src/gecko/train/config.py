"""The typed configuration of a training run (`TrainConfig`), shared by Python and `gecko train`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gecko.models import DEFAULT


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


@dataclass
class StageConfig:
    """The optional pre-finetuning stage: pairs only, in-batch negatives only (no hard negatives,
    no same-tower negatives), before fine-tuning from the same config. Unset fields inherit."""

    data: list[DataSpec]
    steps: int | None = None
    epochs: float = 1.0
    batch_size: int | None = None
    lr: float | None = None


@dataclass
class TrainConfig:
    """Everything a `gecko train` run needs; `train(config)` returns the model folder."""

    data: list[DataSpec]
    out: str
    base: str = DEFAULT  # sentence-transformers folder, or default = packaged all-MiniLM-L6-v2
    dims: list[int] | None = None  # Matryoshka dims (default: full, 256, 128, 64 below full)
    dim_weights: list[float] | None = None
    epochs: float = 1.0
    steps: int | None = None  # overrides epochs
    batch_size: int = 32  # per device
    lr: float = 2e-5
    warmup: float = 0.1  # fraction of steps (< 1) or a number of steps
    weight_decay: float = 0.01
    max_seq_length: int | None = None  # default: the base model's
    temperature: float = 0.05
    same_tower: bool = True
    # Gecko's task prompts on the inputs (the paper); False: plain texts and no saved prompts, as
    # a prompt-less base (all-MiniLM-L6-v2) was trained and as MTEB embeds it
    prompts: bool = True
    hard_negatives: str = "own"  # own | batch | none
    homogeneous: bool = False  # every batch from one source
    examples_per_epoch: int | None = None
    mini_batch_size: int | None = None  # GradCache (cached loss) with this many rows per forward
    # listwise distillation (gecko.train.loss.ListwiseDistillLoss): weight of KL(teacher || student)
    # over each relabeled query's candidates (0 = off; needs the data's `corpus`); the teacher's
    # score (ql | fused | retriever | ql+retriever), its softmax temperature, and how many texts per list
    distill_weight: float = 0.0
    distill_teacher: str = "ql"
    # QL sums log-probabilities over the query: on the demo's relabel output the top-1 / top-2 gap
    # is 6 nats and the top-to-last spread 16 (medians), so t_r = 5 gives a soft, not one-hot, target
    distill_temperature: float = 5.0
    distill_list: int = 8
    gather_across_devices: bool = True  # under DDP: negatives from every device
    bucketed: bool = True  # length-sorted chunked forward (see gecko.train.loss)
    pretrain: StageConfig | None = None
    save_steps: int = 100
    save_total_limit: int = 2
    logging_steps: int = 10
    seed: int = 0
    resume: bool = False
    eval_tasks: list[str] = field(default_factory=list)  # NAME=PATH as for `gecko eval`, run after training
    eval_baseline: bool = False  # also score the base model, for a delta column
    device: str | None = None  # cpu | cuda | None (cuda when available)
    precision: str = "auto"  # auto (bf16 on a GPU that has it) | fp32 | bf16 | fp16
    progress: bool = True
    keep_checkpoints: bool = False

    def __post_init__(self):
        self.data = [d if isinstance(d, DataSpec) else DataSpec.parse(d) if isinstance(d, str) else DataSpec(**d) for d in self.data]
        if isinstance(self.pretrain, dict):
            self.pretrain = StageConfig(**self.pretrain)
        if self.pretrain is not None:
            self.pretrain.data = [d if isinstance(d, DataSpec) else DataSpec.parse(d) if isinstance(d, str) else DataSpec(**d)
                                  for d in self.pretrain.data]
        if not self.data:
            raise ValueError("no training data (give at least one --data)")
        if self.hard_negatives not in ("own", "batch", "none"):
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
        from gecko.train.data import TEACHERS

        if self.distill_weight < 0 or self.distill_teacher not in TEACHERS or self.distill_list < 2:
            raise ValueError(f"distill: weight must be >= 0, teacher one of {', '.join(TEACHERS)}, list at least 2")
        if self.distill_weight and self.mini_batch_size:
            raise ValueError("distill_weight does not combine with mini_batch_size (GradCache) yet")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        self.out = str(self.out)

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
