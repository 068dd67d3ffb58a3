"""Fault harness (issue 16): what survives kill -9, bad LLM output, bad HTTP and bad files.

    .venv/bin/python benchmarks/faults.py [--kills 20] [--fuzz 1000] [--stages generate relabel train encode run]
                                          [--parts kills llm http fuzz] [--seed 0] [--work DIR]

kills: per stage, an uninterrupted reference run, then `--kills` trials: the same command is
  started, killed with SIGKILL (with anything it started) at a seeded random moment, and the
  same command (train: with --resume) run again to the end. The moment follows the work on disk
  (journal lines, checkpoints, output bytes), not the clock: a fifth of the kills before any
  work is on disk, the rest after a random number of units plus a random part of one unit. The final output is compared
  with the reference's, record by record: lost, duplicated, different. Each trial has its own LLM
  cache (GECKO_LLM_CACHE), so "LLM calls repeated" is exact: the backend calls the resumed run
  made (its summary, or the stage manifests of `gecko run`) minus the rows it added to the cache
  (a call already answered before the kill is a cache hit, not a new row). Train: checkpoints
  complete at the kill but not resumed from are "lost"; the trained weights are compared too.
  Encode: at the kill, the .npy / .ids.json pair on disk must load as the old or the new output
  or be refused by `load_embeddings`, never load mismatched.
llm: a fake backend answers generate's prompts with preambles, empty strings, garbage bytes, NUL
  and lone surrogates, 10k-token answers; relabel's scores with NaN, inf and empty token lists
  (strict: a named error; lenient: the query skipped and counted), missing labels, too few scores.
http: a fault-injecting HTTP server in front of the openai backend: timeouts, 5xx, 429, resets,
  bad JSON, wrong shapes, a slow drip; each call must succeed after retries or raise one named
  LLMError within a watchdog.
fuzz: `--fuzz` corpus files (random bytes, truncated gzip, 100 MB lines, deep JSON, NUL bytes,
  bad UTF-8, mutations of a valid file) through `gecko corpus check` (the reader every stage
  uses) in this process: each must pass or fail with one `gecko: error:` line naming the file,
  no traceback, within a time limit.

The kill loops use the packaged LLM (`llm: default`) and MiniLM on a handful of passages, each
process on one thread.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "gecko" / "data" / "sample"
DEMO = REPO / "src" / "gecko" / "data" / "demo.yaml"
GECKO = [sys.executable, "-m", "gecko.cli"]
TIMEOUT_S = 900  # one run of one stage; beyond it the trial counts as a hang


# ---------------------------------------------------------------- shared inputs


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def make_inputs(data: Path, passages: int) -> dict[str, Path]:
    """Seeds (generate), a retrieval pool holding them (relabel), a tiny BEIR task (eval), texts (encode)."""
    sample = _read_jsonl(SAMPLE / "scifact-sample.jsonl")
    mini = SAMPLE / "scifact-mini"
    qrels = [line.split("\t") for line in (mini / "qrels" / "test.tsv").read_text().splitlines()[1:3]]
    docs = _read_jsonl(mini / "corpus.jsonl")
    judged = {d for _, d, _ in qrels}
    queries = {q["_id"]: q for q in _read_jsonl(mini / "queries.jsonl")}
    task = data / "task"
    _jsonl(task / "corpus.jsonl", [d for d in docs if d["_id"] in judged] + [d for d in docs if d["_id"] not in judged][:6])
    _jsonl(task / "queries.jsonl", [queries[q] for q, _, _ in qrels])
    (task / "qrels").mkdir(parents=True, exist_ok=True)
    (task / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in qrels))
    sentences = [s.strip() for p in sample for s in p["text"].split(". ") if len(s.split()) > 3]
    return {
        "seeds": _jsonl(data / "seeds.jsonl", sample[:passages]),
        "pool": _jsonl(data / "pool.jsonl", sample[: 3 * passages]),
        "task": task,
        "texts": _write(data / "texts.txt", "\n".join(sentences[:400]) + "\n"),
        "old_texts": _write(data / "old_texts.txt", "\n".join(reversed(sentences[:300])) + "\n"),
    }


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def env_for(work: Path) -> dict:
    env = dict(os.environ, GECKO_LLM_CACHE=str(work / "llm-cache.sqlite"), GECKO_LLM_THREADS="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def cache_rows(work: Path) -> int:
    path = work / "llm-cache.sqlite"
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


# ---------------------------------------------------------------- kill loops


@dataclass
class Stage:
    """One command under kill -9: how to run it, how far it got, what it produced."""

    name: str
    command: Callable[[Path, bool], list[str]]  # (work dir, resuming) -> argv
    progress: Callable[[Path], int]  # units of finished work on disk (journal lines, checkpoints, output bytes)
    records: Callable[[Path], dict[str, object]]  # final output: key -> comparable value
    resume_calls: Callable[[Path, str, float], int | None]  # (work, resume stdout, resume start) -> backend calls
    prepare: Callable[[Path], None] = lambda work: None  # put what a trial starts from in place
    at_kill: Callable[[Path], str] = lambda work: ""  # a check of the on-disk state at the moment of the kill


def _summary_calls(work: Path, stdout: str, started: float) -> int | None:
    return int(json.loads(stdout.strip().splitlines()[-1])["llm_calls"])


def _manifest_calls(work: Path, stdout: str, started: float) -> int | None:
    """Backend calls of the stages the resumed `gecko run` ran (their manifests were rewritten by it)."""
    calls = 0
    for stage in ("generate", "relabel"):
        path = work / "run" / stage / "manifest.json"
        if path.is_file() and path.stat().st_mtime >= started:
            calls += int(json.loads(path.read_text())["summary"]["llm_calls"])
    return calls


def _generated_records(path: Path) -> dict[str, object]:
    return _keyed(_read_jsonl(path), "id")


def _keyed(rows: list[dict], key: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for row in rows:
        k = row[key]
        out[k if k not in out else f"{k}#dup{len(out)}"] = row  # a duplicate stays visible
    return out


def _relabeled_records(path: Path) -> dict[str, object]:
    rows = _read_jsonl(path)
    return _keyed(rows, "id" if rows and "id" in rows[0] else "query")


def _train_records(model: Path) -> dict[str, object]:
    """The trained weights (rounded) and the logged loss per step."""
    from safetensors.numpy import load_file

    record = json.loads((model / "training.json").read_text())
    out: dict[str, object] = {f"loss@{e['step']}": round(e["loss"], 4) for e in record["stages"][-1]["log_history"] if "loss" in e}
    weights = load_file(str(model / "model.safetensors"))
    out.update({f"weight:{k}": float(np.round(np.abs(v).astype(np.float64).sum(), 2)) for k, v in weights.items()})
    out["model card written"] = (model / "README.md").is_file()
    out["state removed"] = not (model / ".train").exists()
    return out


def _train_calls(work: Path, stdout: str, started: float) -> int | None:
    return None


def _train_progress(work: Path) -> int:
    from gecko.train.run import complete_checkpoints

    return len(complete_checkpoints(work / "model" / ".train" / "finetune" / "checkpoints")) + (work / "model" / "training.json").is_file()


def _train_at_kill(work: Path) -> str:
    from gecko.train.run import complete_checkpoints

    found = complete_checkpoints(work / "model" / ".train" / "finetune" / "checkpoints")
    return f"newest checkpoint {found[-1].name.split('-')[1]}" if found else "no checkpoint"


def _encode_records(work: Path) -> dict[str, object]:
    from gecko.encode import load_embeddings

    ids, emb = load_embeddings(work / "emb.npy")
    return _keyed([{"id": i, "v": tuple(np.round(row, 4).tolist())} for i, row in zip(ids, np.asarray(emb))], "id")


def _run_records(work: Path) -> dict[str, object]:
    run = work / "run"
    out = {f"generated:{k}": v for k, v in _generated_records(run / "generate" / "generated.jsonl").items()}
    out.update({f"relabeled:{k}": v for k, v in _relabeled_records(run / "relabel" / "relabeled.jsonl").items()})
    out.update({f"model:{k}": v for k, v in _train_records(run / "train" / "model").items() if k.startswith(("loss", "weight"))})
    results = json.loads((run / "eval" / "trained" / "results.json").read_text())
    out["eval scores"] = json.dumps(_untimed(results.get("tasks", results)), sort_keys=True, default=str)
    return out


def _untimed(value):
    """A results tree without its timings (they differ from run to run)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if "time" not in k and k not in ("seconds", "date", "created")}
    return [_untimed(v) for v in value] if isinstance(value, list) else value


def _run_progress(work: Path) -> int:
    run = work / "run"
    return sum(_lines(run / s / f"{o}.journal") for s, o in (("generate", "generated.jsonl"), ("relabel", "relabeled.jsonl"))) + \
        sum((run / s / "manifest.json").is_file() for s in ("generate", "relabel", "train", "eval"))


def stages(inputs: dict[str, Path]) -> dict[str, Stage]:
    """The five commands; the relabel and train inputs are the generate and relabel references' outputs."""
    data = inputs["seeds"].parent

    def generate(work: Path, resuming: bool) -> list[str]:
        return [*GECKO, "generate", "--corpus", str(inputs["seeds"]), "--out", str(work / "generated.jsonl"),
                "--batch-size", "1", "--summary-json"]

    def relabel(work: Path, resuming: bool) -> list[str]:
        return [*GECKO, "relabel", "--generated", str(data / "generated.jsonl"), "--corpus", str(inputs["pool"]),
                "--out", str(work / "relabeled.jsonl"), "--top-n", "3", "--max-passage-words", "40",
                "--cache-dir", str(work / "emb"), "--summary-json"]

    def train(work: Path, resuming: bool) -> list[str]:
        return [*GECKO, "train", "--data", str(data / "relabeled.jsonl"), "--out", str(work / "model"), "--steps", "4",
                "--batch-size", "2", "--save-steps", "1", "--logging-steps", "1", "--max-seq-length", "64", "--no-progress",
                *(["--resume"] if resuming else [])]

    def encode(work: Path, resuming: bool) -> list[str]:
        return [*GECKO, "encode", "--input", str(inputs["texts"]), "--out", str(work / "emb.npy"), "--chunk-size", "25",
                "--summary-json"]

    def encode_prepare(work: Path) -> None:  # the previous output of another input is in place
        for name in ("emb.npy", "emb.ids.json"):
            shutil.copy(data / "old" / name, work / name)

    def encode_at_kill(work: Path) -> str:
        from gecko.embed import EmbedError
        from gecko.encode import load_embeddings

        try:
            ids, emb = load_embeddings(work / "emb.npy")
        except EmbedError:
            return "pair refused"
        for name, ref in (("old", data / "old" / "emb.npy"), ("new", data / "new" / "emb.npy")):
            ref_ids, ref_emb = load_embeddings(ref)
            if ids == ref_ids and np.allclose(emb, ref_emb, atol=1e-5):
                return f"pair {name}"
        return "pair MISMATCHED"

    def run(work: Path, resuming: bool) -> list[str]:
        task = {"tiny": {"path": str(inputs["task"]), "type": "retrieval"}}
        return [*GECKO, "run", str(DEMO), f"run_dir={work / 'run'}", f"corpus={inputs['pool']}",
                f"generate.corpus={inputs['seeds']}", "generate.batch_size=1", "relabel.top_n=3",
                "relabel.score.max_passage_words=40", f"relabel.retrieve.cache_dir={work / 'emb'}", "train.steps=4",
                "train.batch_size=2", "train.save_steps=1", "train.max_seq_length=64", "train.holdout=0",
                f"eval.tasks={json.dumps(task)}", "eval.baseline=false", "eval.same_prompts=false",
                f"eval.cache_dir={work / 'emb'}", "--no-progress"]

    return {
        "generate": Stage("generate", generate, lambda w: _lines(w / "generated.jsonl.journal"),
                          lambda w: _generated_records(w / "generated.jsonl"), _summary_calls),
        "relabel": Stage("relabel", relabel, lambda w: _lines(w / "relabeled.jsonl.journal"),
                         lambda w: _relabeled_records(w / "relabeled.jsonl"), _summary_calls),
        "train": Stage("train", train, _train_progress, lambda w: _train_records(w / "model"), _train_calls, at_kill=_train_at_kill),
        "encode": Stage("encode", encode, lambda w: sum(p.stat().st_size for p in w.glob(".emb.npy.*.tmp")),
                        _encode_records, lambda w, s, t: None, prepare=encode_prepare, at_kill=encode_at_kill),
        "run": Stage("run", run, _run_progress, _run_records, _manifest_calls),
    }


@dataclass
class Reference:
    records: dict[str, object]
    rows: int  # LLM cache rows of the uninterrupted run
    start_s: float  # when its first unit of work reached the disk
    end_s: float
    units: int  # units of work on disk just before it ended


@dataclass
class Tally:
    kills: int = 0
    finished_first: int = 0  # the process ended before its kill moment: not a kill
    phases: dict = field(default_factory=dict)  # units done at the kill -> trials
    lost: int = 0
    duplicated: int = 0
    different: int = 0
    repeated_calls: int = 0
    extra_calls: int = 0  # rows beyond the reference's (work an uninterrupted run did not need)
    checkpoints_lost: int = 0
    failures: list = field(default_factory=list)  # resumes that did not finish, with why
    at_kill: dict = field(default_factory=dict)
    seconds: float = 0.0


def _run(cmd: list[str], work: Path, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env_for(work), capture_output=True, text=True, timeout=timeout, cwd=work)


def reference(stage: Stage, work: Path) -> Reference:
    """The uninterrupted run, watched for when its work starts reaching the disk."""
    work.mkdir(parents=True)
    stage.prepare(work)
    begin = time.monotonic()
    proc = subprocess.Popen(stage.command(work, False), env=env_for(work), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=work)
    first, units = None, 0
    while proc.poll() is None:
        units = max(units, stage.progress(work))
        if first is None and units > 0:
            first = time.monotonic() - begin
        time.sleep(0.02)
    end = time.monotonic() - begin
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{stage.name}: the reference run failed:\n{err[-3000:]}")
    return Reference(stage.records(work), cache_rows(work), first if first is not None else 0.5 * end, end, units)


def _compare(ref: dict, got: dict, tally: Tally) -> list[str]:
    lost = [k for k in ref if k not in got]
    dup = [k for k in got if "#dup" in k or k not in ref]
    diff = [k for k in ref if k in got and got[k] != ref[k]]
    tally.lost += len(lost)
    tally.duplicated += len(dup)
    tally.different += len(diff)
    return [f"lost {lost[:3]}"] * bool(lost) + [f"extra {dup[:3]}"] * bool(dup) + [f"different {diff[:3]}"] * bool(diff)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_trials(stage: Stage, ref: Reference, root: Path, kills: int, rng: random.Random, log) -> Tally:
    """The kill moment follows the work, not the clock (the machine's load varies): a fifth of the
    kills at a random time before any work reached the disk, the rest once a random number of
    units is on disk, plus a random part of one unit's time."""
    tally, trial, begin = Tally(), 0, time.monotonic()
    unit_s = (ref.end_s - ref.start_s) / max(ref.units, 1)
    while tally.kills < kills and trial < 3 * kills:
        trial += 1
        work = root / f"trial-{trial}"
        work.mkdir(parents=True)
        stage.prepare(work)
        early = rng.random() < 0.2
        target = 0 if early else rng.uniform(0, ref.units) if ref.units > 100 else rng.randrange(max(ref.units, 1))
        delay = rng.uniform(0, ref.start_s) if early else rng.uniform(0, unit_s)
        started = time.monotonic()
        proc = subprocess.Popen(stage.command(work, False), env=env_for(work), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=work, start_new_session=True)
        while proc.poll() is None and not early and stage.progress(work) < max(target, 1e-9):
            time.sleep(0.01)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        moment = time.monotonic() - started
        if proc.poll() is not None:
            tally.finished_first += 1
            shutil.rmtree(work, ignore_errors=True)
            continue
        _kill_group(proc)  # kill -9, the process and any children it started
        tally.kills += 1
        units = stage.progress(work)
        tally.phases[units] = tally.phases.get(units, 0) + 1
        state = stage.at_kill(work)
        if state:
            tally.at_kill[state] = tally.at_kill.get(state, 0) + 1
        rows_before, started = cache_rows(work), time.time()
        try:
            done = _run(stage.command(work, True), work)
        except subprocess.TimeoutExpired:
            tally.failures.append(f"{stage.name} trial {trial}: resume hung (> {TIMEOUT_S} s)")
            log(f"  {tally.failures[-1]}")
            continue
        if done.returncode:
            tally.failures.append(f"{stage.name} trial {trial} (killed at {moment:.1f} s, {units} units): resume exit "
                                  f"{done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
            log(f"  {tally.failures[-1]}")
            continue
        problems = _compare(ref.records, stage.records(work), tally)
        calls = stage.resume_calls(work, done.stdout, started)
        rows = cache_rows(work)
        if calls is not None:
            repeated = calls - (rows - rows_before)
            tally.repeated_calls += max(0, repeated)
            tally.extra_calls += max(0, rows - ref.rows)
            if repeated:
                problems.append(f"{repeated} LLM calls repeated")
        if state.startswith("newest checkpoint"):
            resumed = json.loads((work / "model" / "training.json").read_text())["stages"][-1].get("resumed_from") or 0
            if resumed < int(state.split()[-1]):
                tally.checkpoints_lost += 1
                problems.append(f"resumed from {resumed}, checkpoint {state.split()[-1]} existed")
        log(f"  {stage.name} kill {tally.kills}/{kills} at {moment:5.1f} s ({units} units done{', ' + state if state else ''})"
            + (": " + "; ".join(problems) if problems else ": identical"))
        if not problems:
            shutil.rmtree(work, ignore_errors=True)
    tally.seconds = time.monotonic() - begin
    return tally


def kill_part(names: list[str], kills: int, rng: random.Random, root: Path, passages: int, log) -> dict[str, Tally]:
    inputs = make_inputs(root / "data", passages)
    data = root / "data"
    all_stages = stages(inputs)
    results: dict[str, Tally] = {}
    refs: dict[str, Reference] = {}
    # the relabel and train inputs are what the references upstream produced
    needed = set(names) | ({"generate"} if {"relabel", "train"} & set(names) else set()) | ({"relabel"} if "train" in names else set())
    if "encode" in names:
        old = data / "old"
        old.mkdir()
        _run([*GECKO, "encode", "--input", str(inputs["old_texts"]), "--out", str(old / "emb.npy"), "--summary-json"], old).check_returncode()
    for name in ("generate", "relabel", "train", "encode", "run"):
        if name not in needed:
            continue
        stage = all_stages[name]
        log(f"{name}: reference run")
        refs[name] = reference(stage, root / name / "reference")
        log(f"{name}: reference {refs[name].end_s:.1f} s, work from {refs[name].start_s:.1f} s, {len(refs[name].records)} records, "
            f"{refs[name].rows} LLM calls")
        if name == "generate":
            shutil.copy(root / name / "reference" / "generated.jsonl", data / "generated.jsonl")
        if name == "relabel":
            shutil.copy(root / name / "reference" / "relabeled.jsonl", data / "relabeled.jsonl")
        if name == "encode":
            (data / "new").mkdir()
            for f in ("emb.npy", "emb.ids.json"):
                shutil.copy(root / name / "reference" / f, data / "new" / f)
        if name in names:
            results[name] = kill_trials(stage, refs[name], root / name, kills, rng, log)
    return results


def kill_table(results: dict[str, Tally]) -> str:
    lines = ["| stage | kills | records lost | duplicated | different | LLM calls repeated | extra LLM calls | checkpoints lost "
             "| resumes failed | units done at the kill (units: trials) | state at the kill | time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    total = Tally()
    for name, t in results.items():
        phases = ", ".join(f"{u}: {n}" for u, n in sorted(t.phases.items()))
        states = ", ".join(f"{s}: {n}" for s, n in sorted(t.at_kill.items())) or "-"
        lines.append(f"| {name} | {t.kills} | {t.lost} | {t.duplicated} | {t.different} | {t.repeated_calls} | {t.extra_calls} | "
                     f"{t.checkpoints_lost} | {len(t.failures)} | {phases} | {states} | {t.seconds / 60:.0f} min |")
        for key in ("kills", "lost", "duplicated", "different", "repeated_calls", "extra_calls", "checkpoints_lost"):
            setattr(total, key, getattr(total, key) + getattr(t, key))
        total.failures += t.failures
    lines.append(f"| **all** | **{total.kills}** | **{total.lost}** | **{total.duplicated}** | {total.different} | "
                 f"**{total.repeated_calls}** | {total.extra_calls} | {total.checkpoints_lost} | {len(total.failures)} | | | |")
    return "\n".join(lines + [f"- {f}" for f in total.failures])


# ---------------------------------------------------------------- outcomes of one bad input


@dataclass
class Outcomes:
    """What bad inputs led to: accepted, refused with a named error, or the failures we hunt."""

    ok: int = 0
    named: int = 0
    unnamed: list = field(default_factory=list)  # an error that does not say which file / what
    tracebacks: list = field(default_factory=list)  # an exception the CLI would print as a traceback
    hangs: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.ok + self.named + len(self.unnamed) + len(self.tracebacks) + len(self.hangs)

    def row(self, name: str) -> str:
        return (f"| {name} | {self.total} | {self.ok} | {self.named} | {len(self.unnamed)} | {len(self.tracebacks)} | "
                f"{len(self.hangs)} | {self.seconds:.0f} s |")


OUTCOME_HEADER = ("| inputs | n | accepted | refused, problem named | refused, not named | tracebacks | hangs | time |\n"
                  "|---|---:|---:|---:|---:|---:|---:|---:|")


def named_errors() -> tuple[type, ...]:
    """The exceptions `gecko.cli.main` prints as one `gecko: error:` line."""
    from gecko.corpus import CorpusError
    from gecko.llm import LLMError

    return (CorpusError, LLMError, FileNotFoundError, ValueError, ModuleNotFoundError)


class Unnoticed(Exception):
    """A problem the harness found in what a call accepted (NaN written, passages dropped)."""


def _watchdog(fn: Callable[[], object], limit: float) -> tuple[str, object]:
    """("ok", value) | ("error", exception) | ("hang", None): `fn` in a thread, given `limit` seconds."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - classified by the caller
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        return "hang", None
    return ("error", box["error"]) if "error" in box else ("ok", box.get("value"))


# ---------------------------------------------------------------- malformed LLM output


def _malformed_answers(rng: random.Random) -> list[str]:
    garbage = bytes(rng.randrange(256) for _ in range(200)).decode("latin-1")
    return [
        " Here are three questions about the passage: 1. what is it?", " Sure! Here is a query:", "", "   ", "\n",
        garbage, "\x00\x00\x00 vitamin \x00", "\ud800\udfff lone surrogates \udc80", " " + "word " * 10_000,
        " " + "vitamin" * 3000, "<|endoftext|><eos>", " {\"query\": \"json instead of text\"}", " 1234 5678 9999",
        " Which of the following is true?", " " + "\u202e\u200b" * 50, " what does the passage say about cells?",
    ]


class MalformedLLM:
    """generate: an answer drawn from `_malformed_answers` per prompt (or a wrong number of answers);
    score_and_label: NaN, inf, empty token lists, missing labels."""

    identity = "faults:malformed"

    def __init__(self, seed: int, mode: str):
        self.rng = random.Random(seed)
        self.answers = _malformed_answers(self.rng)
        self.mode = mode

    def generate(self, prompts, params):
        answers = [self.rng.choice(self.answers) for _ in prompts]
        if self.mode == "fewer answers":
            return answers[:-1]
        if self.mode == "more answers":
            return answers + ["extra"]
        if self.mode == "not strings":
            return [None, 42, b"bytes"][: len(prompts)] + answers[3:]
        return answers

    def score_and_label(self, prefix, requests):
        from gecko.llm.base import ContinuationScore, JointScore, LabelScores

        out = []
        for r in requests:
            value = self.rng.choice([float("nan"), float("inf"), float("-inf"), -1e308, 0.0, -3.0])
            tokens = [] if self.rng.random() < 0.3 else ["x"] * 3
            labels = {} if self.mode == "missing labels" else {label: self.rng.choice([float("nan"), -0.5, float("-inf")]) for label in r.labels}
            out.append(JointScore(ContinuationScore(tokens, [value] * len(tokens)), LabelScores(labels)))
        return out[:-1] if self.mode == "fewer scores" else out

    def score(self, prefix, continuations):
        raise AssertionError("relabel uses score_and_label here")

    def label_logprobs(self, prompt, labels):
        raise AssertionError("relabel uses score_and_label here")


def _classify(outcomes: Outcomes, kind: str, what: str, result: object, needle: str | None) -> None:
    status, value = result
    if status == "hang":
        outcomes.hangs.append(what)
    elif status == "ok":
        outcomes.ok += 1
    elif isinstance(value, Unnoticed):
        outcomes.unnamed.append(f"{what}: {value}")
    elif isinstance(value, named_errors()) and (needle is None or needle in str(value)):
        outcomes.named += 1
    elif isinstance(value, named_errors()):
        outcomes.unnamed.append(f"{what}: {type(value).__name__}: {str(value)[:160]}")
    else:
        outcomes.tracebacks.append(f"{what}: {type(value).__name__}: {str(value)[:160]}")


def llm_part(root: Path, rng: random.Random, log) -> dict[str, Outcomes]:
    from gecko.generate import GenerateConfig, run_generate
    from gecko.relabel import RelabelConfig, run_relabel
    from gecko.retrieve import RetrieveConfig

    inputs = make_inputs(root / "data", 4)
    results = {"generate, malformed answers": Outcomes(), "relabel, malformed scores": Outcomes()}
    out = results["generate, malformed answers"]
    begin = time.monotonic()
    modes = ["answers"] * 16 + ["fewer answers", "more answers", "not strings"]
    for i, mode in enumerate(modes):
        target = root / "llm" / f"gen-{i}" / "generated.jsonl"
        llm = MalformedLLM(rng.randrange(2**31), mode)

        def call():
            summary = run_generate(inputs["seeds"], target, llm, GenerateConfig(max_attempts=3), progress=False)
            # every passage accounted for: a query, or rejections that say why
            if summary.passages != 4 or summary.accepted + sum(summary.rejected.values()) < summary.passages:
                raise Unnoticed(f"passages not accounted for: {summary.to_dict()}")
            for line in target.read_text().splitlines():
                json.loads(line)
            return summary

        result = _watchdog(call, 120)
        if result[0] == "ok" and mode.endswith("answers") and mode != "answers":  # a wrong number must not pass unnoticed
            out.unnamed.append(f"generate/{mode}: accepted without an error (slots without an answer are dropped)")
        elif result[0] == "ok" and mode == "not strings" and not result[1].rejected.get("not text"):
            out.unnamed.append(f"generate/{mode}: accepted without counting the non-text answers")
        else:
            _classify(out, "generate", f"generate/{mode}/{i}", result, None)
    out.seconds = time.monotonic() - begin
    generated = root / "llm" / "queries" / "generated.jsonl"
    _jsonl(generated, [{"id": f"q{i}", "seed_id": p["_id"], "task_type": "question_answering", "task": "Given a question, "
                        "retrieve passages that answer the question", "query": f"what does the study of {p['title'][:40]} show?"}
                       for i, p in enumerate(_read_jsonl(inputs["seeds"]))])
    rel = results["relabel, malformed scores"]
    begin = time.monotonic()
    for i, mode in enumerate(["scores"] * 3 + ["scores, lenient"] * 3 + ["missing labels", "fewer scores"]):
        llm = MalformedLLM(rng.randrange(2**31), mode)
        target = root / "llm" / f"rel-{i}" / "relabeled.jsonl"
        config = RelabelConfig(top_n=3, lenient=mode.endswith("lenient"), retrieve=RetrieveConfig(cache_dir=str(root / "llm" / "emb")))

        def call():
            summary = run_relabel(generated, inputs["pool"], target, llm, config, progress=False)
            written = target.read_text().splitlines() + [target.with_name(target.name + ".summary.json").read_text()]
            for line in written:
                json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(Unnoticed(f"accepted, and wrote {c} into the output")))
            if summary.examples + sum(summary.skipped.values()) != summary.queries:
                raise Unnoticed(f"queries not accounted for: {summary.to_dict()}")
            return summary

        _classify(rel, "relabel", f"relabel/{mode}/{i}", _watchdog(call, 300), None)
    rel.seconds = time.monotonic() - begin
    return results


# ---------------------------------------------------------------- HTTP faults


class FaultServer:
    """An OpenAI-compatible /v1 that answers each request with the next fault of `script`, then normally.

    Faults: hang (longer than the client's timeout), 500, 502, 503, 429, reset (RST on the socket),
    close (no status line), badjson, shape (valid JSON, wrong fields), drip (a correct answer, one
    byte every `drip_s`), headdrip (its status line and headers so), huge (a 20 MB answer)."""

    def __init__(self, hang_s: float = 3.0, drip_s: float = 0.2):
        self.script: list[str] = []
        self.hang_s, self.drip_s = hang_s, drip_s
        self.requests = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def next_fault(self) -> str | None:
        with self._lock:
            self.requests += 1
            return self.script.pop(0) if self.script else None

    @staticmethod
    def answer(path: str, body: dict) -> dict:
        if path.endswith("/models"):
            return {"object": "list", "data": [{"id": "fake", "object": "model"}]}
        prompt = body.get("prompt", "")
        if body.get("echo"):  # teacher-forced scoring: one token per character of the prompt
            tokens = list(prompt)
            offsets = list(range(len(prompt)))
            logprobs = [None] + [-1.0 - (i % 3) * 0.1 for i in range(1, len(tokens))]
            return {"choices": [{"text": prompt, "logprobs": {"tokens": tokens, "token_logprobs": logprobs, "text_offset": offsets},
                                 "finish_reason": "length"}], "usage": {"prompt_tokens": len(tokens), "completion_tokens": 0}}
        return {"choices": [{"text": " does vitamin d help?", "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 5}}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self._serve({})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    self._serve(json.loads(raw or b"{}"))
                except ValueError:
                    self._send(400, b'{"error": {"message": "bad request"}}')

            def _serve(self, body: dict) -> None:
                fault = server.next_fault()
                try:
                    if fault == "hang":
                        time.sleep(server.hang_s)
                    elif fault in ("500", "502", "503", "429"):
                        return self._send(int(fault), b'{"error": {"message": "injected"}}')
                    elif fault == "reset":
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                        self.close_connection = True
                        return
                    elif fault == "close":
                        self.close_connection = True
                        return
                    elif fault == "badjson":
                        return self._send(200, b'{"choices": [ not json')
                    elif fault == "shape":
                        return self._send(200, b'{"choices": "nope", "usage": []}')
                    elif fault == "huge":
                        return self._send(200, b'{"choices": [{"text": "' + b"a" * 20_000_000 + b'"}]}')
                    payload = json.dumps(server.answer(self.path, body)).encode()
                    self._send(200, payload, drip=fault if fault in ("drip", "headdrip") else None)
                except OSError:
                    self.close_connection = True

            def _send(self, status: int, payload: bytes, drip: str | None = None) -> None:
                """drip: the body ("drip") or the status line and headers ("headdrip") one byte every drip_s."""
                head = (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                        f"X-Padding: {'x' * 40}\r\n\r\n").encode()
                if drip == "headdrip":
                    self._trickle(head)
                    self.wfile.write(payload)
                elif drip == "drip":
                    self.wfile.write(head)
                    self._trickle(payload)
                else:
                    self.wfile.write(head + payload)

            def _trickle(self, data: bytes) -> None:
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(server.drip_s)

        return Handler


HTTP_FAULTS = ("hang", "500", "502", "503", "429", "reset", "close", "badjson", "shape", "drip", "headdrip", "huge")


def http_part(rng: random.Random, log, cases: int = 72) -> dict[str, Outcomes]:
    """Each case: a run of 1-4 faults of one kind, then a generate or a score call through the openai
    backend (timeout 1 s, so a 2 s deadline per attempt; 2 retries): fewer faults than attempts must
    succeed, more must fail naming it."""
    from gecko.llm import GenerationParams, LLMError
    from gecko.llm.openai import OpenAILLM

    server = FaultServer()
    results: dict[str, Outcomes] = {}
    try:
        llm = OpenAILLM(server.url, "fake", mode="completions", timeout=1.0, connect_timeout=1.0, max_retries=2, backoff=0.01, quiet=True)
        for i in range(cases):
            fault = HTTP_FAULTS[i % len(HTTP_FAULTS)]
            count = rng.randint(1, 4)
            call = rng.choice(["generate", "score"])
            out = results.setdefault(fault, Outcomes())
            server.script = [fault] * count
            begin = time.monotonic()
            if call == "generate":
                result = _watchdog(lambda: llm.generate(["Passage: cats. Query:"], GenerationParams(max_tokens=8)), 60)
            else:
                result = _watchdog(lambda: llm.score("Passage: cats purr.\nQuery:", [" do cats purr?"]), 60)
            out.seconds += time.monotonic() - begin
            expect_ok = count <= 2
            what = f"{fault} x{count} on {call}"
            if result[0] == "ok" and not expect_ok and fault != "huge":
                out.unnamed.append(f"{what}: succeeded although every attempt failed")
            elif result[0] == "error" and isinstance(result[1], LLMError) and expect_ok and fault != "huge":
                out.unnamed.append(f"{what}: failed although a retry was left: {result[1]}")
            else:
                _classify(out, "http", what, result, server.url.split("/v1")[0])
            if result[0] == "hang":  # let the stuck call drain before the next case
                server.script = []
                time.sleep(1)
            log(f"  http {what}: {result[0]}" + (f" ({type(result[1]).__name__}: {str(result[1])[:120]})" if result[0] == "error" else ""))
    finally:
        server.close()
    return results


# ---------------------------------------------------------------- fuzzed corpus files


def _valid_jsonl(rng: random.Random, n: int = 20) -> bytes:
    rows = [{"_id": f"d{i}", "title": f"title {i}", "text": " ".join(rng.choice(["cells", "protein", "the", "vitamin", "risk"])
                                                                         for _ in range(rng.randint(1, 30)))} for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 12)):
        op = rng.randrange(5)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op == 1:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2:
            del data[pos : pos + rng.randint(1, 40)]
        elif op == 3:
            data[pos:pos] = rng.choice([b"\x00", b"\n", b'"', b"{", b"}", b"\\", b"\xff\xfe", b"\xed\xa0\x80", b'"_id": null,'])
        else:
            data[pos:pos] = data[rng.randrange(len(data) + 1):][:60]
    return bytes(data)


def fuzz_case(i: int, rng: random.Random, folder: Path) -> Path:
    """One bad corpus file (or folder) of a kind chosen by `i`."""
    kind = i % 12
    base = _valid_jsonl(rng)
    if kind == 0:
        return _bytes(folder / f"{i}.jsonl", bytes(rng.randrange(256) for _ in range(rng.randint(0, 4000))))
    if kind == 1:
        whole = gzip.compress(base)
        return _bytes(folder / f"{i}.jsonl.gz", whole[: rng.randrange(len(whole))])
    if kind == 2:
        return _bytes(folder / f"{i}.jsonl.gz", _mutate(gzip.compress(base), rng))
    if kind == 3:
        depth = rng.choice([100, 10_000, 100_000, 1_000_000])
        return _bytes(folder / f"{i}.jsonl", b'{"_id": "x", "text": ' + b"[" * depth + b"]" * depth + b"}\n" + base)
    if kind == 4:
        return _bytes(folder / f"{i}.jsonl", base.replace(b" ", b"\x00", rng.randint(1, 20)))
    if kind == 5:
        big = i % 120 == 5  # a few 100 MB lines, most of them 1 MB
        size = 100_000_000 if big else 1_000_000
        return _bytes(folder / f"{i}.jsonl", b'{"_id": "long", "text": "' + b"a " * (size // 2) + b'"}\n' + base)
    if kind == 6:
        return _bytes(folder / f"{i}.csv", _mutate(b"id,title,text\n" + b"".join(f"d{j},t,{'x y ' * j}\n".encode() for j in range(20)), rng))
    if kind == 7:
        return _bytes(folder / f"{i}.tsv", _mutate(b"_id\ttext\n" + b"".join(f"d{j}\tsome text {j}\n".encode() for j in range(20)), rng))
    if kind == 8:
        return _bytes(folder / f"{i}.parquet", _mutate(_parquet_bytes(), rng))
    if kind == 9:  # a BEIR folder with a mutated corpus
        beir = folder / f"{i}-beir"
        beir.mkdir()
        _bytes(beir / "corpus.jsonl", _mutate(base, rng))
        return beir
    if kind == 10:
        return _bytes(folder / f"{i}.jsonl", rng.choice([b"", b"\n\n\n", b"\xef\xbb\xbf", b"null\n", b"[]\n", b'"text"\n', b"1e999999\n",
                                                         b'{"_id": 1, "text": 2}\n', b'{"_id": "a", "text": "\\ud800"}\n']) + _mutate(base, rng))
    return _bytes(folder / f"{i}.jsonl", _mutate(base, rng))


_PARQUET: list[bytes] = []


def _parquet_bytes() -> bytes:
    if not _PARQUET:
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = io.BytesIO()
        pq.write_table(pa.table({"_id": [f"d{j}" for j in range(20)], "text": [f"text {j}" for j in range(20)]}), sink)
        _PARQUET.append(sink.getvalue())
    return _PARQUET[0]


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def fuzz_part(n: int, rng: random.Random, root: Path, log, limit_s: float = 120) -> dict[str, Outcomes]:
    """`gecko corpus check FILE` in this process for each fuzzed input: exit 0, or exit 2 with one
    `gecko: error:` line naming the file; an exception escaping main() is a traceback."""
    from gecko.cli import main

    folder = root / "fuzz"
    folder.mkdir(parents=True)
    results: dict[str, Outcomes] = {}
    names = ["random bytes", "truncated gzip", "mutated gzip", "deep JSON", "NUL bytes", "long lines (1 MB, 100 MB)",
             "mutated CSV", "mutated TSV", "mutated Parquet", "mutated BEIR folder", "odd JSON values", "mutated JSONL"]
    for i in range(n):
        path = fuzz_case(i, rng, folder)
        out = results.setdefault(names[i % 12], Outcomes())
        begin = time.monotonic()
        err = io.StringIO()

        def call():
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                return main(["corpus", "check", str(path)])

        status, value = _watchdog(call, limit_s)
        out.seconds += time.monotonic() - begin
        lines = [line for line in err.getvalue().splitlines() if line.startswith("gecko: error: ")]
        if status == "hang":
            out.hangs.append(str(path))
        elif status == "error":
            out.tracebacks.append(f"{path.name}: {type(value).__name__}: {str(value)[:160]}")
        elif value == 0:
            out.ok += 1
        elif len(lines) == 1 and path.name in lines[0]:
            out.named += 1
        else:
            out.unnamed.append(f"{path.name}: exit {value}: {err.getvalue().strip()[-200:]!r}")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        if (i + 1) % 100 == 0:
            log(f"  fuzz {i + 1}/{n}")
    return results


def outcome_table(results: dict[str, Outcomes]) -> str:
    lines = [OUTCOME_HEADER]
    total = Outcomes()
    for name, o in results.items():
        lines.append(o.row(name))
        total.ok += o.ok
        total.named += o.named
        total.seconds += o.seconds
        for key in ("unnamed", "tracebacks", "hangs"):
            getattr(total, key).extend(getattr(o, key))
    lines.append(total.row("**all**"))
    for key in ("unnamed", "tracebacks", "hangs"):
        label = {"unnamed": "not named", "tracebacks": "traceback", "hangs": "hang"}[key]
        lines += [f"- {label}: {x}" for x in getattr(total, key)[:15]]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="kill -9 trials per stage")
    parser.add_argument("--fuzz", type=int, default=1000, help="fuzzed corpus files")
    parser.add_argument("--stages", nargs="+", default=["generate", "relabel", "train", "encode", "run"],
                        choices=["generate", "relabel", "train", "encode", "run"])
    parser.add_argument("--parts", nargs="+", default=["kills", "llm", "http", "fuzz"], choices=["kills", "llm", "http", "fuzz"])
    parser.add_argument("--passages", type=int, default=4, help="seed passages of the kill loops")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="work folder (default: a temp folder, removed at the end)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PYTHONPATH"] = str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gecko-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    begin = time.monotonic()

    def log(text: str) -> None:
        print(f"[{time.monotonic() - begin:6.0f} s] {text}", file=sys.stderr, flush=True)

    tables = []
    try:
        if "kills" in args.parts:
            results = kill_part(args.stages, args.kills, random.Random(rng.random()), root / "kills", args.passages, log)
            tables.append("### kill -9 and resume\n\n" + kill_table(results))
        if "llm" in args.parts:
            tables.append("### malformed LLM output (fake backend)\n\n" + outcome_table(llm_part(root / "llm", random.Random(rng.random()), log)))
        if "http" in args.parts:
            tables.append("### HTTP faults to the openai backend\n\n" + outcome_table(http_part(random.Random(rng.random()), log)))
        if "fuzz" in args.parts:
            tables.append("### fuzzed corpus files (`gecko corpus check`)\n\n" + outcome_table(
                fuzz_part(args.fuzz, random.Random(rng.random()), root / "fuzz", log)))
    finally:
        if not args.work:
            shutil.rmtree(root, ignore_errors=True)
    print(f"seed {args.seed}, {time.monotonic() - begin:.0f} s, load average {os.getloadavg()[0]:.1f}\n")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
