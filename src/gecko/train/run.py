"""`train(config) -> Path`: the Gecko fine-tuning run on sentence-transformers' Trainer.

Layout of the output folder `OUT` (a sentence-transformers model once finished):

    OUT/                     the trained model (SentenceTransformer(OUT) loads it offline)
    OUT/README.md            model card: data and counts, dims, prompts, loss settings, eval numbers
    OUT/loss.png             loss curve (all stages)
    OUT/training.json        the config, data counts, loss, throughput and log history
    OUT/train_log.jsonl      events as they happen: start / resume (with the step), logs, checkpoints, end
    OUT/.train/              working state, deleted at the end unless keep_checkpoints:
        config.json          the run's config (a --resume must match it)
        pretrain/checkpoints/checkpoint-N, pretrain/model   (the optional pre-finetuning stage)
        finetune/checkpoints/checkpoint-N

Checkpoints are the Trainer's (model, optimizer, scheduler, RNG, trainer state; trainer_state.json
is written last, so a checkpoint without it is incomplete and ignored). `resume=True` continues
from the newest complete checkpoint: the global step, the learning-rate schedule and the data
order (a seeded sampler, batches already seen are skipped) continue where they were.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from gecko.formats import DOCUMENT_PROMPT, GENERIC_QUERY_TASK, TextFormat, query_prompt
from gecko.journal import write_json_atomic
from gecko.models import resolve_embedder
from gecko.train.config import StageConfig, TrainConfig
from gecko.train.data import Mixture, SourceData, build_mixture, load_source, to_columns

logger = logging.getLogger(__name__)

STATE_DIR = ".train"
DEFAULT_SMALLER_DIMS = (256, 128, 64)


class TrainError(ValueError):
    """A training run that cannot start as asked (bad output folder, a --resume that does not match)."""


def default_dims(full: int) -> list[int]:
    """The full dimension plus 256, 128 and 64 below it: 384, 256, 128, 64 for MiniLM."""
    return [full] + [d for d in DEFAULT_SMALLER_DIMS if d < full]


def saved_prompts(prompts: bool = True) -> dict[str, str]:
    """The prompts saved with the model (config_sentence_transformers.json).

    `query`: a generic query (`task: search result | query: `), used by `model.encode_query(x)`;
    `document`: `title: none | text: ` (used by `model.encode_document(x)`); and one per known
    retrieval task (`scifact`) with its task description. Symmetric tasks (STS, classification)
    get none: the students scored STS-B points lower with the sentence-similarity prompt than
    with the plain sentences (README, Quality), so the card says to embed those texts as they are,
    and `gecko eval --prompts model` does. No default prompt is set, so `model.encode(x)` embeds x
    as given. A model trained without prompts (`TrainConfig.prompts` off) saves none.
    """
    from gecko.evaluate.tasks import KNOWN_TASKS

    if not prompts:
        return {}

    prompts = {"query": query_prompt(GENERIC_QUERY_TASK), "document": DOCUMENT_PROMPT}
    for name, known in KNOWN_TASKS.items():
        if not known.cls.symmetric:  # a query and its documents: the task's own query prompt
            prompts[name] = query_prompt(known.prompt)
    return prompts


# ---------------------------------------------------------------- distributed helpers


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------- event log


class EventLog:
    """Append-only JSON lines (rank 0 only): what happened, when, at which step."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def write(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"event": event, "time": round(time.time(), 3), **fields}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line after kill -9
        return out


# ---------------------------------------------------------------- checkpoints


def complete_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints with trainer_state.json (written last), oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.glob("checkpoint-*"):
        try:
            step = int(path.name.split("-", 1)[1])
        except ValueError:
            continue
        state = path / "trainer_state.json"
        if path.is_dir() and state.is_file():
            try:
                json.loads(state.read_text())
            except (json.JSONDecodeError, OSError):
                continue
            found.append((step, path))
    return [p for _, p in sorted(found)]


def _drop_incomplete(directory: Path) -> None:
    complete = set(complete_checkpoints(directory))
    if directory.is_dir():
        for path in directory.glob("checkpoint-*"):
            if path.is_dir() and path not in complete:
                shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- stage


@dataclass
class StageResult:
    name: str
    steps: int
    examples: int  # examples seen by this process' run of the stage (all devices)
    seconds: float
    examples_per_s: float
    resumed_from: int | None
    log_history: list[dict]
    mixture: dict[str, int]
    sources: list[dict]
    loss: dict
    args: dict
    model_path: str | None = None
    skipped: bool = False
    extra: dict = field(default_factory=dict)


def build_datasets(mixture: Mixture, *, homogeneous: bool, hard_negatives: str, seed: int, listwise: int = 0,
                   teacher: str = "ql", retriever_weight: float = 0.0):
    """A Dataset (mixed batches) or a DatasetDict (one source per batch), whether the loss reads
    negative counts from the `label` column, and the number of negative columns."""
    from datasets import Dataset, DatasetDict

    def negatives_of(rows) -> int:
        return 0 if hard_negatives == "none" else max((len(e.negatives) for e in rows), default=0)

    if homogeneous:
        if listwise:
            raise TrainError("listwise distillation needs mixed batches (homogeneous: false)")
        parts = {}
        uses_counts = False
        for name, rows in mixture.per_source.items():
            k = negatives_of(rows)
            padded = k > 0 and any(len(e.negatives) < k for e in rows)
            uses_counts |= padded
            parts[name] = Dataset.from_dict(to_columns(rows, k, count_column=k > 0))
        return DatasetDict(parts), uses_counts or any("label" in d.column_names for d in parts.values()), 0
    rows = [e for part in mixture.per_source.values() for e in part]
    k = negatives_of(rows)
    dataset = Dataset.from_dict(to_columns(rows, k, count_column=k > 0, listwise=listwise, teacher=teacher,
                                            retriever_weight=retriever_weight))
    return dataset, k > 0, k


def make_loss(model, config: TrainConfig, *, same_tower: bool, hard_negatives: str, uses_counts: bool, dims: list[int],
              homogeneous: bool, distill_negatives: int | None = None):
    """(the loss to train with, the Gecko loss inside it); `distill_negatives`: the negative
    columns before the candidate columns when the listwise term is on (None: off)."""
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss

    from gecko.train.loss import CachedListwiseDistillLoss, GeckoCachedLoss, GeckoLoss, ListwiseDistillLoss

    gather = config.gather_across_devices and _world() > 1
    if gather and homogeneous and hard_negatives == "batch":
        # devices may hold batches of different sources (different negative columns): nothing to gather them with
        logger.warning("homogeneous batches under DDP: hard_negatives='batch' cannot gather negatives; using 'own'")
        hard_negatives = "own"
    common = dict(temperature=config.temperature, same_tower=same_tower, hard_negatives=hard_negatives,
                  negatives_in_label=uses_counts, gather_across_devices=gather)
    distill = dict(weight=config.distill_weight, teacher_temperature=config.distill_temperature, negatives=distill_negatives)
    if config.mini_batch_size and distill_negatives is not None:
        outer = CachedListwiseDistillLoss(model, mini_batch_size=config.mini_batch_size, **distill, **common)
    elif config.mini_batch_size:
        outer = GeckoCachedLoss(model, mini_batch_size=config.mini_batch_size, **common)
    else:
        outer = GeckoLoss(model, bucketed=config.bucketed, **common)
        if distill_negatives is not None:
            outer = ListwiseDistillLoss(model, outer, **distill)
    full = model.get_embedding_dimension()
    if dims == [full]:
        return outer, outer
    weights = config.dim_weights or [1.0] * len(dims)
    return MatryoshkaLoss(model, outer, matryoshka_dims=dims, matryoshka_weights=weights), outer


def _trainer_class():
    from sentence_transformers import SentenceTransformerTrainer
    from transformers.trainer import TRAINING_ARGS_NAME

    class _Trainer(SentenceTransformerTrainer):
        """Checkpoints without a generated model card (the final card is ours)."""

        def _save(self, output_dir: str | None = None, state_dict=None) -> None:
            import torch

            output_dir = output_dir if output_dir is not None else self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            self.model.save_pretrained(output_dir, create_model_card=False)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    return _Trainer


def _callbacks(events: EventLog, stage: str, examples_per_step: int, progress: bool):
    from transformers import TrainerCallback

    class GeckoProgress(TrainerCallback):
        """A progress bar with the last loss and examples/s; events to train_log.jsonl."""

        def __init__(self):
            self.bar = None
            self.start = None
            self.first_step = 0
            self.last_loss = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            self.first_step = state.global_step
            if state.is_world_process_zero and progress:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=f"train {stage}", unit="step",
                                dynamic_ncols=True)

        def rate(self, state) -> float:
            elapsed = time.perf_counter() - (self.start or time.perf_counter())
            done = state.global_step - self.first_step
            return done * examples_per_step / elapsed if elapsed > 0 and done > 0 else 0.0

        def _postfix(self, state, refresh: bool) -> None:
            if self.bar is not None:
                postfix = {"ex/s": f"{self.rate(state):.1f}"}
                if self.last_loss is not None:
                    postfix = {"loss": f"{self.last_loss:.4f}", **postfix}
                self.bar.set_postfix(postfix, refresh=refresh)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
                self._postfix(state, refresh=False)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                self.last_loss = float(logs["loss"])
                self._postfix(state, refresh=True)
                events.write("log", stage=stage, step=state.global_step, loss=self.last_loss,
                             lr=logs.get("learning_rate"), examples_per_s=round(self.rate(state), 3))

        def on_save(self, args, state, control, **kwargs):
            events.write("checkpoint", stage=stage, step=state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return GeckoProgress()


def _teacher_scores(sources: list[SourceData]) -> frozenset[str]:
    """The teacher scores that every example with candidates has for all of them (a default teacher
    must not silently leave out the rows of an older relabel output)."""
    found = [frozenset(k for _, scores in e.candidates for k, v in scores.items() if v is not None)
             for s in sources for e in s.examples if e.candidates]
    return frozenset.intersection(*found) if found else frozenset()


def _stage_data(name: str, config: TrainConfig, sources: list[SourceData], hard_negatives: str):
    """(the config with its automatic settings resolved for this data, the mixture, its dataset,
    whether the loss reads negative counts, the negative columns, whether the listwise term is on)."""
    if hard_negatives == "none":  # pairs only: do not embed negatives the loss ignores
        for source in sources:
            for example in source.examples:
                example.negatives = []
    mixture = build_mixture(sources, examples_per_epoch=config.examples_per_epoch, seed=config.seed)
    has_candidates = any(e.candidates for s in sources for e in s.examples)
    if config.distill_weight and not has_candidates and name == "finetune":
        raise TrainError("distill_weight > 0 but no training example has candidates: give the relabeled data's corpus "
                         "(DataSpec.corpus, `--data PATH` with `--corpus`)")
    config = config.resolved(has_candidates, _teacher_scores(sources))
    distill = bool(config.distill_weight) and has_candidates
    dataset, uses_counts, negatives = build_datasets(
        mixture, homogeneous=config.homogeneous, hard_negatives=hard_negatives, seed=config.seed,
        listwise=config.distill_list if distill else 0, teacher=config.distill_teacher,
        retriever_weight=config.distill_temperature / config.temperature)
    return config, mixture, dataset, uses_counts, negatives, distill


def _load_model(base: str, config: TrainConfig):
    """(the model to train, whether it runs on the CPU, the base model's max_seq_length)."""
    import torch
    from sentence_transformers import SentenceTransformer

    use_cpu = config.device == "cpu" or (config.device is None and not torch.cuda.is_available())
    model = SentenceTransformer(resolve_embedder(base), device="cpu" if use_cpu else config.device)
    base_max_seq_length = model.max_seq_length
    if config.max_seq_length:
        model.max_seq_length = config.max_seq_length
    # the transformer's pooler head is not used by sentence-transformers' pooling; frozen, so DDP
    # does not wait for gradients that never come (no find_unused_parameters graph walk each step)
    for param_name, param in model.named_parameters():
        if ".pooler." in param_name:
            param.requires_grad_(False)
    return model, use_cpu, base_max_seq_length


def _training_args(config: TrainConfig, checkpoints: Path, params: dict, *, drop_last: bool, use_cpu: bool, precision: str):
    """The Trainer's arguments: `params` are the stage's steps, epochs, batch size and learning rate."""
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers, MultiDatasetBatchSamplers

    world = _world()
    return SentenceTransformerTrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=params["batch_size"],
        learning_rate=params["lr"],
        num_train_epochs=params["epochs"],
        max_steps=params["steps"] or -1,
        warmup_steps=config.warmup if config.warmup < 1 else int(config.warmup),
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        multi_dataset_batch_sampler=MultiDatasetBatchSamplers.PROPORTIONAL,
        dataloader_drop_last=drop_last,
        report_to="none",
        disable_tqdm=True,
        use_cpu=use_cpu,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        ddp_backend="gloo" if (use_cpu and world > 1) else None,
        ddp_find_unused_parameters=False if world > 1 else None,
    )


def _resume_point(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint (rank 0 first removes incomplete ones)."""
    if _rank() == 0:
        _drop_incomplete(checkpoints)
    _barrier()
    found = complete_checkpoints(checkpoints)
    return found[-1] if found else None


def _loss_record(config: TrainConfig, inner, dims: list[int], *, hard_negatives: str, same_tower: bool, distill: bool) -> dict:
    """The loss as training.json and the model card describe it."""
    negatives = {"own": ", own hard negatives", "batch": ", all in-batch hard negatives"}.get(hard_negatives, "")
    listwise = (f"; + {config.distill_weight:g} x KL(teacher {config.distill_teacher} at t={config.distill_temperature:g} || student) over {config.distill_list} "
                "candidates per query" if distill else "")
    return {
        "name": type(inner).__name__,
        "formula": "softmax cross-entropy over in-batch positives" + negatives
        + (", same-tower (other queries)" if same_tower else "") + listwise,
        **inner.get_config_dict(),
        "matryoshka_dims": dims,
        "matryoshka_weights": list(config.dim_weights or [1.0] * len(dims)),
    }


def _bf16_fast_here(use_cpu: bool) -> bool:
    """`--precision auto`: bf16 autocast on a GPU that has it, or on a CPU with bf16 hardware, where a
    training step of the default run took 0.5x the float32 time with the same quality on SciFact dev
    (benchmarks/RESULTS.md, "Training under CPU bf16 autocast")."""
    import torch

    from gecko.llm.engine import fast_bf16

    return fast_bf16(torch.get_num_threads()) if use_cpu else torch.cuda.is_bf16_supported()


def _run_stage(name: str, config: TrainConfig, *, base: str, sources: list[SourceData], params: dict, same_tower: bool,
               hard_negatives: str, stage_dir: Path, events: EventLog):
    """One stage (pretrain or finetune) from its data to its StageResult; `params` as `_stage_params` gives them."""
    import torch
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    config, mixture, dataset, uses_counts, negatives, distill = _stage_data(name, config, sources, hard_negatives)
    model, use_cpu, base_max_seq_length = _load_model(base, config)
    full = model.get_embedding_dimension()
    dims = config.dims or default_dims(full)
    if dims[0] > full:
        raise TrainError(f"dims {dims}: the base model has {full} dimensions")
    loss, inner = make_loss(model, config, same_tower=same_tower, hard_negatives=hard_negatives, uses_counts=uses_counts,
                            dims=dims, homogeneous=config.homogeneous, distill_negatives=negatives if distill else None)

    world, batch_size = _world(), params["batch_size"]
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if _bf16_fast_here(use_cpu) else "fp32"
    checkpoints = stage_dir / "checkpoints"
    args = _training_args(config, checkpoints, params, drop_last=mixture.total >= batch_size * world, use_cpu=use_cpu,
                          precision=precision)
    progress = _callbacks(events, name, batch_size * world, config.progress)
    trainer = _trainer_class()(model=model, args=args, train_dataset=dataset, loss=loss, callbacks=[progress])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

    resume_from = _resume_point(checkpoints) if config.resume else None
    resumed_step = int(resume_from.name.split("-", 1)[1]) if resume_from else None
    events.write("resume" if resume_from else "start", stage=name, resumed_from=resumed_step,
                 checkpoint=str(resume_from) if resume_from else None, examples=mixture.total, world_size=world)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - start
    steps_taken = trainer.state.global_step - (resumed_step or 0)
    if not steps_taken:  # else the base model would be saved as if trained
        raise TrainError(f"{name}: no training step was taken: not one batch of {batch_size} rows without a repeated "
                         f"text could be drawn from the {mixture.total} rows (no-duplicates batches); lower --batch-size "
                         "and choose a new --out")
    examples = steps_taken * batch_size * world
    result = StageResult(
        name=name,
        steps=trainer.state.global_step,
        examples=examples,
        seconds=round(seconds, 2),
        examples_per_s=round(examples / seconds, 2) if seconds > 0 else 0.0,
        resumed_from=resumed_step,
        log_history=list(trainer.state.log_history),
        mixture=mixture.counts(),
        sources=[s.describe() for s in mixture.sources],
        loss=_loss_record(config, inner, dims, hard_negatives=hard_negatives, same_tower=same_tower, distill=distill),
        args={
            "batch_size_per_device": batch_size,
            "world_size": world,
            "learning_rate": params["lr"],
            "epochs": params["epochs"],
            "max_steps": params["steps"],
            "warmup": config.warmup,
            "weight_decay": config.weight_decay,
            "max_seq_length": model.max_seq_length,
            "precision": precision,
            "device": str(model.device),
            "homogeneous_batches": config.homogeneous,
            "batch_sampler": "no duplicates" + (", proportional per source" if config.homogeneous else ""),
            "mini_batch_size": config.mini_batch_size,
        },
        extra={"base_max_seq_length": base_max_seq_length},
    )
    events.write("end", stage=name, global_step=trainer.state.global_step, examples=examples, seconds=round(seconds, 2))
    return result, trainer, model


def _stage_params(config: TrainConfig, stage: StageConfig | None):
    if stage is None:
        return dict(steps=config.steps, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr)
    return dict(steps=stage.steps, epochs=stage.epochs, batch_size=stage.batch_size or config.batch_size,
                lr=stage.lr or config.lr)


# ---------------------------------------------------------------- the run


def _check_out(out: Path, config: TrainConfig) -> bool:
    """Validate the output folder; True when the run is already complete (resume of a finished run)."""
    state = out / STATE_DIR / "config.json"
    if (out / "training.json").is_file():
        if config.resume:
            return True
        raise TrainError(f"{out}: already holds a finished training run; choose a new --out")
    if state.exists():
        if not config.resume:
            raise TrainError(f"{out}: holds an unfinished training run; pass --resume to continue it, or choose a new --out")
        saved = json.loads(state.read_text(encoding="utf-8"))
        mine = config.fingerprint()
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if diff:
            raise TrainError(f"{out}: --resume with a different configuration ({', '.join(diff)}); "
                             "use the original arguments or a new --out")
        return False
    if out.exists() and any(out.iterdir()):
        raise TrainError(f"{out}: exists and is not empty; choose a new --out")
    return False


def train(config: TrainConfig) -> Path:
    """Train per `config`; returns the output folder (a sentence-transformers model)."""
    out = Path(config.out)
    main = _rank() == 0
    if (out / "training.json").is_file() and config.resume:
        if main and (out / STATE_DIR).exists():  # killed after the model was saved: eval, card, clean-up
            record = json.loads((out / "training.json").read_text(encoding="utf-8"))
            _complete(out, config, record, record["stages"][-1]["loss"]["matryoshka_dims"])
        return out  # every rank sees the same finished folder
    if main:
        _check_out(out, config)
    # read once; bad data fails here, before the run's state exists
    fmt = TextFormat(config.prompts)
    sources = [load_source(spec, seed=config.seed, fmt=fmt) for spec in config.data]
    pretrain_sources = [load_source(spec, seed=config.seed, fmt=fmt) for spec in config.pretrain.data] if config.pretrain else []
    state_dir = out / STATE_DIR
    if main:
        state_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(state_dir / "config.json", config.fingerprint())
    events = EventLog(out / "train_log.jsonl", enabled=main)
    results: list[StageResult] = []
    base = config.base

    if config.pretrain is not None:
        pre_dir = state_dir / "pretrain"
        model_dir = pre_dir / "model"
        if (model_dir / ".complete").exists():
            saved = json.loads((model_dir / ".complete").read_text())
            results.append(StageResult(**{**saved, "skipped": True}))
            events.write("skip", stage="pretrain", reason="finished earlier")
        else:
            result, trainer, model = _run_stage("pretrain", config, base=base, sources=pretrain_sources,
                                                params=_stage_params(config, config.pretrain), same_tower=False,
                                                hard_negatives="none", stage_dir=pre_dir, events=events)
            if main:
                model.max_seq_length = result.extra["base_max_seq_length"]
                model.save(str(model_dir), create_model_card=False)
                result.model_path = str(model_dir)
                write_json_atomic(model_dir / ".complete", result.__dict__)
            results.append(result)
            del trainer, model
        _barrier()
        base = str(model_dir)

    result, trainer, model = _run_stage("finetune", config, base=base, sources=sources, params=_stage_params(config, None),
                                        same_tower=config.same_tower, hard_negatives=config.hard_negatives,
                                        stage_dir=state_dir / "finetune", events=events)
    results.append(result)
    if main:
        _finish(out, config, model, results, events, sources)
    _barrier()
    return out


def _finish(out: Path, config: TrainConfig, model, results: list[StageResult], events: EventLog,
            sources: list[SourceData]) -> None:
    from gecko.train.card import plot_loss

    model.prompts = saved_prompts(config.prompts)
    model.default_prompt_name = None
    # --max-seq-length is a training setting; the saved model keeps the base model's for inference
    model.max_seq_length = results[-1].extra.get("base_max_seq_length") or model.max_seq_length
    axes = _rotate(model, config, sources, results[-1].loss["matryoshka_dims"], events) if config.principal_axes else None
    model.save(str(out), create_model_card=False)
    plot_loss(results, out / "loss.png")
    record = {
        "format": "gecko-train/1",
        "base": config.base,
        "base_path": resolve_embedder(config.base),
        "config": config.to_dict(),
        "prompts": saved_prompts(config.prompts),
        "stages": [r.__dict__ for r in results],
        "principal_axes": axes,
        "versions": _versions(),
    }
    write_json_atomic(out / "training.json", record)
    events.write("done", out=str(out))
    _complete(out, config, record, results[-1].loss["matryoshka_dims"])


def _rotate(model, config: TrainConfig, sources: list[SourceData], dims: list[int], events: EventLog) -> dict:
    """Rotate the trained model onto its principal axes over the data's corpus (every corpus a
    source names), else over the training passages (positives and negatives)."""
    from gecko.train.axes import corpus_documents, rotate_onto_principal_axes, seeded_sample

    corpus = [p for s in sources for p in s.corpus]
    if corpus:
        documents = corpus_documents(corpus, config.axes_documents, config.seed, TextFormat(config.prompts))
    else:
        passages = dict.fromkeys(t for s in sources for e in s.examples for t in (e.positive, *e.negatives))
        documents = seeded_sample(list(passages), config.axes_documents, config.seed)
    start = time.perf_counter()
    summary = rotate_onto_principal_axes(model, documents, dims)
    fitted_on = "corpus" if corpus else "training passages"
    summary = {"fitted_on": fitted_on, **summary, "seconds": round(time.perf_counter() - start, 2)}
    events.write("principal_axes", **summary)
    return summary


def _complete(out: Path, config: TrainConfig, record: dict, dims: list[int]) -> None:
    """After training.json: evaluation, the model card, then the state removed (the last step, so
    a run killed before it is completed by `--resume`)."""
    from gecko.train.card import write_model_card

    # evaluated last: README.md and hidden files are not part of the model identity the eval cache keys on
    eval_md = _evaluate(out, config, dims) if config.eval_tasks else None
    write_model_card(out, record, eval_md)
    if not config.keep_checkpoints:
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def _evaluate(out: Path, config: TrainConfig, dims: list[int]) -> str:
    """Score the trained model (and the base, when asked) with `gecko.evaluate`; markdown table."""
    from gecko.evaluate import evaluate, load_baseline

    options = dict(prompts="model", progress=config.progress)  # as the card says; the base as MTEB scores it
    results = evaluate(str(out), config.eval_tasks, dims, **options)
    baseline = load_baseline(config.base, config.eval_tasks, dims, **options) if config.eval_baseline else None
    results.write(out / ".eval", baseline=baseline)
    return results.table(baseline)


def _versions() -> dict[str, str]:
    import platform

    import sentence_transformers
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__}
