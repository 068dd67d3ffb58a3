"""`run_pipeline(config)`: generate → relabel → train → eval in one run folder, each stage once.

    RUN_DIR/config.yaml                 the config as run (every default filled in)
    RUN_DIR/generate/generated.jsonl    (+ .journal, .summary.json)  FRet step 1
    RUN_DIR/relabel/relabeled.jsonl     (+ .journal, .summary.json)  FRet step 2
    RUN_DIR/train/model/                the trained sentence-transformers model (loss.png, training.json)
    RUN_DIR/eval/base/, eval/trained/   results.json, results.md, score_vs_dim.png
    RUN_DIR/<stage>/manifest.json       status, the stage's config, input and output hashes, counts, timings
    RUN_DIR/report.md, *.png            the run report

A stage's fingerprint is the hash of its config and the content hashes of its inputs (an
upstream stage's output is a downstream input). A rerun skips a stage whose manifest says done
with the same fingerprint and whose outputs are intact; a stage marked running with the same
fingerprint was interrupted and is resumed by its own mechanism (journals, train's checkpoints);
anything else (a changed key, a changed input) clears the stage folder and runs it afresh.
Manifests are written atomically, at the start (running) and at the end (done).
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from gecko.journal import write_json_atomic, write_text_atomic
from gecko.llm import LLMSpec
from gecko.models import DEFAULT
from gecko.pipeline.config import PipelineConfig, plain_data
from gecko.pipeline.report import before_after_rows, before_after_table, write_report

MANIFEST_FORMAT = "gecko-run-stage/1"


class PipelineError(RuntimeError):
    """A run that cannot proceed (its folder is in use, a stage's input is missing)."""


@dataclass
class StageRun:
    name: str
    status: str  # ran | resumed | skipped
    manifest: dict


@dataclass
class RunResult:
    run_dir: Path
    stages: list[StageRun]
    report: Path
    results: object  # gecko.evaluate.Results of the trained model
    baseline: object | None  # ... of the base model (eval.baseline)

    @property
    def status(self) -> dict[str, str]:
        return {s.name: s.status for s in self.stages}

    def table(self) -> str:
        return before_after_table(self.results, self.baseline)


# ---------------------------------------------------------------- identities


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents; hidden files and README.md
    skipped, as for the embedding cache's model identity); memoised by size and mtime."""
    from gecko.embed import model_identity

    if not path.exists():
        raise PipelineError(f"{path}: no such file or directory")
    return model_identity(path)


def llm_identity(spec: str) -> str:
    """What the LLM's outputs depend on, named without loading it: the engine `default` runs on
    here with its dtype and the model file's hash; a local model's content hash; else the spec."""
    parsed = LLMSpec.parse(spec)
    kind, target = parsed.kind, parsed.target
    if target in ("", DEFAULT) and kind in (DEFAULT, "llamacpp", "transformers"):
        from gecko.llm.engine import choose_engine, default_dtype
        from gecko.models import default_gguf_path, file_sha256

        sha = file_sha256(default_gguf_path())
        if kind == DEFAULT:
            kind = choose_engine().backend
        return f"llamacpp:{sha}" if kind == "llamacpp" else f"transformers:{sha}:{default_dtype(None)}"
    if kind in ("llamacpp", "transformers") and Path(target).exists():
        return f"{kind}:{content_hash(Path(target))}"
    return spec


def embedder_identity(spec: str) -> str:
    from gecko.models import resolve_embedder

    return content_hash(Path(resolve_embedder(spec)))


# ---------------------------------------------------------------- the run


class _Context:
    def __init__(self, config: PipelineConfig, llm, progress: bool):
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.progress = progress
        self._llm = llm

    def llm(self):
        """Loaded on first use: a rerun whose LLM stages are all done never loads it."""
        if self._llm is None:
            from gecko.llm import load_llm

            self._llm = load_llm(self.config.llm, cache=self.config.llm_cache, **self.config.llm_load_options())
        return self._llm

    def say(self, text: str) -> None:
        if self.progress:
            print(text, flush=True)


@dataclass
class _Stage:
    name: str
    plan: Callable  # ctx -> (config dict, {role: input path})
    run: Callable  # (ctx, stage dir, resume) -> ({role: output path}, counts, summary dict, text to show)


def run_pipeline(config: PipelineConfig, *, llm=None, progress: bool = True) -> RunResult:
    """Run every stage that is not done yet (see the module doc); write the report; return it all.

    `llm`: an LLM to use instead of loading `config.llm` (e.g. one shared by tests)."""
    from gecko.evaluate import load_results

    ctx = _Context(config, llm, progress)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    with _lock(ctx.run_dir):
        write_text_atomic(ctx.run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))
        runs = [_run_stage(ctx, stage) for stage in _STAGES]
        eval_dir = ctx.run_dir / "eval"
        results = load_results(eval_dir / "trained")
        baseline = load_results(eval_dir / "base") if (eval_dir / "base" / "results.json").is_file() else None
        report = write_report(ctx.run_dir, config, runs, results, baseline)
    return RunResult(ctx.run_dir, runs, report, results, baseline)


def start_in_background(config: PipelineConfig, argv: list[str]) -> tuple[int, Path]:
    """Start `gecko run ARGV` as a process of its own session, so it outlives the shell (and the
    session) that started it; its output goes to RUN_DIR/run.log, its pid to RUN_DIR/run.pid.

    Rerunning the same command after a crash, a kill or a reboot resumes it (manifests, journals,
    checkpoints, LLM cache). Refused while another `gecko run` holds the folder."""
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = _acquire(run_dir)  # fails now, not in the log, if the folder is busy
    try:
        log = run_dir / "run.log"
        with log.open("a") as out:
            out.write(f"\n== {_now()} gecko run {' '.join(argv)}\n")
            out.flush()
            # the child inherits the held lock (flock belongs to the open file, not the process), so no
            # second start can slip in between this check and the child's own start
            env = {**os.environ, LOCK_FD_ENV: str(lock.fileno())}
            proc = subprocess.Popen([sys.executable, "-m", "gecko.cli", "run", *argv], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=(lock.fileno(),), env=env)
    finally:
        lock.close()  # the child's copy keeps the lock
    write_text_atomic(run_dir / "run.pid", f"{proc.pid}\n")
    return proc.pid, log


LOCK_FD_ENV = "GECKO_RUN_LOCK_FD"  # a lock on RUN_DIR/.lock handed down by `start_in_background`


@contextmanager
def _lock(run_dir: Path):
    """One `gecko run` per folder at a time (the lock dies with its process, kill -9 included)."""
    handle = _inherited(run_dir) or _acquire(run_dir)
    try:
        yield
    finally:
        handle.close()


def _acquire(run_dir: Path):
    handle = (run_dir / ".lock").open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise PipelineError(f"{run_dir}: another gecko run is using this folder") from None
    return handle


def _inherited(run_dir: Path):
    """The lock the starting process held for us, if it is this folder's (same file)."""
    fd = os.environ.get(LOCK_FD_ENV, "")
    try:
        same = fd.isdigit() and os.path.samestat(os.fstat(int(fd)), os.stat(run_dir / ".lock"))
    except OSError:
        return None
    if not same:
        return None
    del os.environ[LOCK_FD_ENV]
    return os.fdopen(int(fd), "a")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None


def _intact(manifest: dict, run_dir: Path) -> bool:
    for output in manifest.get("outputs", {}).values():
        path = run_dir / output["path"]
        if not path.exists() or content_hash(path) != output["sha256"]:
            return False
    return True


def _run_stage(ctx: _Context, stage: _Stage) -> StageRun:
    directory = ctx.run_dir / stage.name
    path = directory / "manifest.json"
    config, input_paths = stage.plan(ctx)
    inputs = {role: {"path": str(p), "sha256": content_hash(Path(p))} for role, p in input_paths.items()}
    fingerprint = hashlib.sha256(
        json.dumps({"config": config, "inputs": {r: i["sha256"] for r, i in inputs.items()}}, sort_keys=True).encode()
    ).hexdigest()
    old = read_manifest(path)
    same = old is not None and old.get("fingerprint") == fingerprint
    if same and old["status"] == "done" and _intact(old, ctx.run_dir):
        ctx.say(f"== {stage.name}: done earlier ({old['finished']}), inputs and config unchanged: skipped")
        return StageRun(stage.name, "skipped", old)
    # a manifest that exists but cannot be read was torn by a crash: never delete the stage's work
    # for it; the stage resumes from its own journal or checkpoints, which check their own settings
    torn = old is None and path.exists()
    resume = (same and old["status"] == "running") or torn
    if not resume and directory.exists():
        shutil.rmtree(directory)  # outputs of another config or input (LLM calls stay in the LLM cache)
    reason = ("its manifest is unreadable: resuming from the stage's own journal" if torn else
              "resuming an interrupted run" if resume else "its outputs were changed or removed: running again" if same
              else "config or inputs changed: running again" if old else "first run")
    ctx.say(f"== {stage.name}: {reason}")
    manifest = {"format": MANIFEST_FORMAT, "stage": stage.name, "status": "running", "fingerprint": fingerprint,
                "config": config, "inputs": inputs, "started": _now(),
                "attempt": (old.get("attempt", 1) + 1) if resume and old else 1}
    write_json_atomic(path, manifest)
    started = time.perf_counter()
    outputs, counts, summary, text = stage.run(ctx, directory, resume)
    manifest.update(status="done", finished=_now(), wall_s=round(time.perf_counter() - started, 2))
    manifest.update(outputs={role: {"path": str(p.relative_to(ctx.run_dir)), "sha256": content_hash(p)}
                             for role, p in outputs.items()}, counts=counts, summary=summary)
    write_json_atomic(path, manifest)
    ctx.say(text + f"\n({stage.name}: {manifest['wall_s']:.0f} s)\n")
    return StageRun(stage.name, "resumed" if resume else "ran", manifest)


# ---------------------------------------------------------------- the stages


def _generate_plan(ctx: _Context):
    st = ctx.config.generate
    config = {"generate": plain_data(st.config), "limit": st.limit, "sample": st.sample, "lenient": st.lenient,
              "llm": llm_identity(ctx.config.llm)}
    return config, {"corpus": st.corpus or ctx.config.corpus}


def _generate_run(ctx: _Context, directory: Path, resume: bool):
    from gecko.generate import run_generate

    st = ctx.config.generate
    out = directory / "generated.jsonl"
    summary = run_generate(st.corpus or ctx.config.corpus, out, ctx.llm(), st.config, limit=st.limit, lenient=st.lenient,
                           progress=ctx.progress, sample=st.sample)
    if not summary.accepted:
        raise PipelineError(f"generate: no query was accepted for any of {summary.passages} passages; see {out}.summary.json")
    counts = {"passages": summary.passages, "corpus_passages": summary.corpus_passages,
              "passages_with_query": summary.passages_with_query, "queries": summary.accepted}
    return {"generated": out}, counts, summary.to_dict(), summary.render()


def _relabel_plan(ctx: _Context):
    st = ctx.config.relabel
    config = {"relabel": plain_data(st.config), "limit": st.limit, "llm": llm_identity(ctx.config.llm),
              "embedder": embedder_identity(st.config.retrieve.embedder)}
    return config, {"generated": ctx.run_dir / "generate" / "generated.jsonl", "corpus": ctx.config.corpus}


def _relabel_run(ctx: _Context, directory: Path, resume: bool):
    from gecko.relabel import run_relabel

    st = ctx.config.relabel
    out = directory / "relabeled.jsonl"
    summary = run_relabel(ctx.run_dir / "generate" / "generated.jsonl", ctx.config.corpus, out, ctx.llm(), st.config,
                          limit=st.limit, progress=ctx.progress)
    if not summary.examples:
        raise PipelineError(f"relabel: no training example was written (skipped: {dict(summary.skipped)})")
    counts = {"queries": summary.queries, "examples": summary.examples, "positive_changed": summary.positive_changed,
              "pairs_scored": summary.pairs_scored}
    return {"examples": out}, counts, summary.to_dict(), summary.render()


def _without_path(spec) -> dict:
    return {k: v for k, v in plain_data(spec).items() if k != "path"}


def _train_plan(ctx: _Context):
    st = ctx.config.train
    settings = plain_data(st.settings)
    inputs = {"examples": ctx.run_dir / "relabel" / "relabeled.jsonl"}
    inputs.update({f"data.{i}": d.path for i, d in enumerate(st.data)})
    pretrain = st.settings.get("pretrain")
    if pretrain is not None:  # its sources are inputs too: hashed, not named by path
        settings["pretrain"]["data"] = [_without_path(d) for d in pretrain.data]
        inputs.update({f"pretrain.data.{i}": d.path for i, d in enumerate(pretrain.data)})
    config = {"settings": settings, "base": embedder_identity(st.settings.get("base", DEFAULT)),
              "data": [_without_path(d) for d in st.data], "weight": st.weight, "holdout": [st.holdout, st.holdout_max]}
    inputs["corpus"] = ctx.config.corpus  # the held-out check's corpus, the listwise term's candidate texts
    return config, inputs


def _train_run(ctx: _Context, directory: Path, resume: bool):
    from gecko.pipeline.holdout import split_holdout
    from gecko.train import train

    st = ctx.config.train
    model = directory / "model"
    if not (model / ".train" / "config.json").is_file() and model.exists():
        shutil.rmtree(model)  # killed before its first state was saved: nothing to resume
    split = split_holdout(ctx.run_dir / "relabel" / "relabeled.jsonl", ctx.config.corpus, directory, st.holdout, st.holdout_max)
    config = st.train_config(split.train, ctx.config.corpus, model, resume=resume, progress=ctx.progress)
    train(config)
    record = json.loads((model / "training.json").read_text(encoding="utf-8"))
    last = record["stages"][-1]
    counts = {"steps": last["steps"], "mixture": last["mixture"], "dims": last["loss"]["matryoshka_dims"],
              "held_out_queries": split.held_out}
    losses = [e["loss"] for e in last["log_history"] if "loss" in e]
    summary = {"stages": [{k: s[k] for k in ("name", "steps", "examples", "seconds", "examples_per_s", "resumed_from", "mixture")}
                          for s in record["stages"]],
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
    text = (f"trained {last['steps']} steps on {sum(last['mixture'].values())} examples ({last['mixture']}), "
            f"loss {' -> '.join(f'{v:.3f}' for v in losses[:1] + losses[-1:])}; model: {model}")
    outputs = {"model": model} | ({"holdout": split.folder / "qrels" / "test.tsv"} if split.folder else {})
    return outputs, counts, summary, text


def _eval_plan(ctx: _Context):
    st = ctx.config.eval
    config = {**{k: v for k, v in plain_data(st).items() if k not in ("tasks", "cache_dir")},
              "tasks": [_without_path(t) for t in st.tasks],
              "base": embedder_identity(ctx.config.train.settings.get("base", DEFAULT)) if st.baseline else None}
    inputs = {"model": ctx.run_dir / "train" / "model"}
    inputs.update({f"task.{t.name}": t.path for t in st.tasks})
    if (_holdout_folder(ctx) / "qrels").is_dir():
        inputs["task.holdout"] = _holdout_folder(ctx) / "qrels"
    return config, inputs


def _holdout_folder(ctx: _Context) -> Path:
    from gecko.pipeline.holdout import TASK_NAME

    return ctx.run_dir / "train" / TASK_NAME


def _eval_run(ctx: _Context, directory: Path, resume: bool):
    from gecko.evaluate import evaluate

    st = ctx.config.eval
    model = ctx.run_dir / "train" / "model"
    dims = list(st.dims) if st.dims else json.loads((model / "training.json").read_text())["stages"][-1]["loss"]["matryoshka_dims"]
    tasks = [t.resolve() for t in st.tasks]
    if (_holdout_folder(ctx) / "qrels").is_dir():
        from gecko.evaluate.tasks import resolve_task

        tasks.append(resolve_task("holdout", _holdout_folder(ctx), type="retrieval"))
    options = dict(backend=st.backend, cache_dir=st.cache_dir, device=st.device, batch_size=st.batch_size, progress=ctx.progress)
    outputs, rows = {}, {}
    modes = [("", st.prompts)] + ([("-gecko", "gecko")] if st.same_prompts and st.prompts != "gecko" else [])
    for suffix, mode in modes:
        trained = evaluate(str(model), tasks, dims, prompts=mode, **options)
        base = evaluate(ctx.config.train.settings.get("base", DEFAULT), tasks, dims, prompts=mode, **options) if st.baseline else None
        outputs[f"trained{suffix}"] = directory / f"trained{suffix}" / "results.json"
        if base is not None:
            base.write(directory / f"base{suffix}")
            outputs[f"base{suffix}"] = directory / f"base{suffix}" / "results.json"
        trained.write(directory / f"trained{suffix}", baseline=base)
        rows[mode] = before_after_rows(trained, base)
        if not suffix:
            table = before_after_table(trained, base)
    counts = {"tasks": [t.name for t in tasks], "dims": dims, "prompts": [mode for _, mode in modes]}
    return outputs, counts, {"before_after": rows[st.prompts], "before_after_by_prompts": rows}, table


_STAGES = [_Stage("generate", _generate_plan, _generate_run), _Stage("relabel", _relabel_plan, _relabel_run),
           _Stage("train", _train_plan, _train_run), _Stage("eval", _eval_plan, _eval_run)]
STAGES = tuple(s.name for s in _STAGES)
