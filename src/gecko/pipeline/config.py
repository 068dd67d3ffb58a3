"""The typed configuration of `gecko run`: one YAML file, one section per stage.

    run_dir: runs/scifact          # outputs; relative to the current directory
    corpus: data/corpus.jsonl      # the passages (queries are retrieved in it); relative to this file
    llm: default
    generate: {limit: 1000, ...}   # GenerateConfig's fields, plus corpus / limit / sample / lenient
    relabel: {top_n: 20, score: {max_passage_words: 200}, ...}   # RelabelConfig's, plus limit
    train: {epochs: 1, data: [...], ...}   # TrainConfig's; data = sources mixed with the relabeled examples
    eval: {tasks: {scifact: path}, dims: [...], ...}

Every key is checked: an unknown one is an error naming its path and line (`relabel.fusoin`), a
value of the wrong type or range names its path too. `key=value` overrides (dotted paths, values
read as YAML) are applied after the file. Relative data paths in the file (corpus,
generate.corpus, train.data, train.pretrain.data, eval.tasks) are resolved against the file's
folder, so a config and its data travel together; everything else, and every path given on the
command line, is relative to the current directory.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gecko.generate import PASSAGE_SAMPLE, GenerateConfig, check_passage_choice
from gecko.llm.usage import Price
from gecko.models import DEFAULT
from gecko.relabel import RelabelConfig
from gecko.train import DataSpec, StageConfig, TrainConfig

# TrainConfig fields the pipeline sets itself: data (the relabel output, plus train.data), out,
# resume (after an interruption), progress, and the evaluation (the eval stage's job)
TRAIN_OWN = ("data", "out", "resume", "progress", "eval_tasks", "eval_baseline")


class ConfigError(ValueError):
    """A config that cannot run; the message names the file (and line) or the command line, and the key path."""


@dataclass(frozen=True)
class GenerateStage:
    """`generate:`: GenerateConfig's fields, plus which passages get queries."""

    config: GenerateConfig = GenerateConfig()
    corpus: str | None = None  # passages to write queries for; default: the run's corpus
    limit: int | None = None  # only the first N passages
    sample: int | None = PASSAGE_SAMPLE  # then a seeded uniform sample of N of them (null: every one)
    lenient: bool = False  # skip and count bad corpus records

    def __post_init__(self):
        check_passage_choice(self.limit, self.sample)


@dataclass(frozen=True)
class RelabelStage:
    """`relabel:`: RelabelConfig's fields (`score:` ScoreConfig, `retrieve:` RetrieveConfig), plus limit."""

    config: RelabelConfig = RelabelConfig()
    limit: int | None = None  # only the first N generated queries

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1 (or null for all), got {self.limit}")


@dataclass(frozen=True)
class TrainStage:
    """`train:`: TrainConfig's fields; `data` are more sources, mixed with the relabeled examples
    (which are used `weight` times per epoch)."""

    settings: dict = field(default_factory=dict)  # TrainConfig fields other than TRAIN_OWN
    data: tuple[DataSpec, ...] = ()
    weight: float = 1.0
    # the label-free check (gecko.pipeline.holdout): this share of the seed passages' queries is
    # never trained on and is scored before/after in eval (at most holdout_max queries; 0: none)
    holdout: float = 0.05
    holdout_max: int = 500

    def train_config(self, examples: Path, corpus: str, out: Path, *, resume: bool, progress: bool) -> TrainConfig:
        """`corpus`: where the relabeled candidates' texts are, read unless the listwise
        distillation term is off (`distill_weight: 0`)."""
        listwise = corpus if self.settings.get("distill_weight") != 0 else None
        data = [DataSpec(str(examples), weight=self.weight, name="fret", kind="examples", corpus=listwise), *self.data]
        return TrainConfig(data=data, out=str(out), resume=resume, progress=progress, **self.settings)


@dataclass(frozen=True)
class EvalTask:
    """One evaluation task: a dataset folder, typed by its name or contents (see `gecko eval`)."""

    name: str
    path: str
    type: str | None = None  # retrieval | sts | classification (default: known name, or sniffed)
    split: str | None = None
    prompt: str | None = None  # the task description in `task: ... | query: ...` (default: the known task's)

    def resolve(self):
        from gecko.evaluate.tasks import resolve_task

        task = resolve_task(self.name, self.path, type=self.type, split=self.split)
        return dataclasses.replace(task, prompt=self.prompt) if self.prompt else task


@dataclass(frozen=True)
class EvalStage:
    """`eval:`: the trained model (and the base, for the before column) on `tasks` at every dim."""

    tasks: tuple[EvalTask, ...] = ()
    dims: tuple[int, ...] | None = None  # default: the Matryoshka dims the model was trained for
    # both models as users will use them: the trained one with the prompts its card gives, the
    # base as MTEB scores it (it saves none: plain texts); gecko | none: one mode for both
    prompts: str | bool = "model"
    same_prompts: bool = True  # also both with the Gecko formats (the same-prompts table)
    baseline: bool = True  # also score train.base: the "before" column
    backend: str = "auto"  # auto | mteb | builtin
    batch_size: int = 64
    device: str | None = None
    cache_dir: str | None = None  # embedding cache (default: $GECKO_HOME/embeddings)


@dataclass(frozen=True)
class PipelineConfig:
    run_dir: str
    corpus: str
    llm: str = DEFAULT  # default | llamacpp:PATH.gguf | openai:URL#MODEL | transformers:DIR
    llm_cache: str | None = None  # SQLite call cache (default: GECKO_LLM_CACHE or $GECKO_HOME/llm-cache.sqlite)
    # backend options, e.g. {batch: true} (OpenAI's Batch API), {max_concurrency: 8}, {mode: chat}
    llm_options: dict = field(default_factory=dict)
    # US dollars per million tokens by model name, e.g. {gpt-4o-mini: {input: 0.15, output: 0.6}}: the
    # summaries and report.md estimate each stage's cost from them
    prices: dict[str, Price] = field(default_factory=dict)
    # stop an LLM stage (cleanly: rerun with a higher budget to go on) once this run has spent this much
    max_cost: float | None = None
    generate: GenerateStage = GenerateStage()
    relabel: RelabelStage = RelabelStage()
    train: TrainStage = TrainStage()
    eval: EvalStage = EvalStage()
    source: str | None = None  # the file it was read from, for the report

    def llm_load_options(self) -> dict:
        """`load_llm`'s keyword arguments besides the spec and the cache."""
        return {"prices": dict(self.prices), "max_cost": self.max_cost, **self.llm_options}

    def to_dict(self) -> dict:
        """The config in the YAML layout (the form `load_config` reads)."""
        out = {"run_dir": self.run_dir, "corpus": self.corpus, "llm": self.llm, "llm_cache": self.llm_cache,
               "llm_options": dict(self.llm_options), "prices": plain_data(self.prices), "max_cost": self.max_cost}
        g, r, t, e = self.generate, self.relabel, self.train, self.eval
        out["generate"] = {**plain_data(g.config), "corpus": g.corpus, "limit": g.limit, "sample": g.sample,
                           "lenient": g.lenient}
        out["relabel"] = {**plain_data(r.config), "limit": r.limit}
        out["train"] = {**plain_data(t.settings), "data": [plain_data(d) for d in t.data], "weight": t.weight,
                        "holdout": t.holdout, "holdout_max": t.holdout_max}
        out["eval"] = {**plain_data(e), "tasks": {x.name: {k: v for k, v in plain_data(x).items() if k != "name"} for x in e.tasks}}
        return out


def plain_data(value: Any) -> Any:
    """Dataclasses, tuples and paths as YAML-friendly dicts, lists and strings."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    return str(value) if isinstance(value, Path) else value


# ---------------------------------------------------------------- reading


def load_config(source: str | Path | dict, overrides: typing.Iterable[str] = ()) -> PipelineConfig:
    """The config in a YAML file (or a dict in the same layout), with `key=value` overrides
    applied; raises ConfigError naming the file and line, or the command line, and the key path."""
    raw: Any = copy.deepcopy(source) if isinstance(source, dict) else {}
    lines: dict[str, int] = {}
    path = None if isinstance(source, dict) else Path(source)
    where = str(path) if path is not None else "config"
    given: set[str] = set()

    def locate(key: str) -> str:
        parts = key.split(".")
        prefixes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
        if any(p in given for p in prefixes) or any(g.startswith(key + ".") for g in given):
            return "command line"
        return next((f"{where}:{lines[p]}" for p in prefixes if p in lines), where)

    try:
        if path is not None:
            raw, lines = _read_yaml(path)
            _resolve_paths(raw, path.resolve().parent)
        for item in overrides:
            given.add(_apply_override(raw, item))
        config = _build(raw)
    except _KeyProblem as err:
        raise ConfigError(f"{locate(err.key)}: {err.key}: {err.message}") from None
    return dataclasses.replace(config, source=str(path) if path is not None else None)


def _read_yaml(path: Path) -> tuple[dict, dict[str, int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror or err}") from None
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(err, 'problem', None) or err}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (run_dir, corpus, generate, relabel, train, eval)")
    lines: dict[str, int] = {}
    _key_lines(node, "", lines)
    return raw, lines


class _KeyProblem(Exception):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def _key_lines(node, prefix: str, out: dict[str, int]) -> None:
    """Dotted key path -> line number (1-based), from the composed YAML node tree."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            _key_lines(value_node, key + ".", out)


def _resolve(value: Any, base: Path) -> Any:
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    return os.path.normpath(path if path.is_absolute() else base / path)


def _resolve_paths(raw: dict, base: Path) -> None:
    """Data paths written in a config file are relative to its folder."""
    if "corpus" in raw:
        raw["corpus"] = _resolve(raw["corpus"], base)
    generate = raw.get("generate")
    if isinstance(generate, dict) and generate.get("corpus"):
        generate["corpus"] = _resolve(generate["corpus"], base)
    train = raw["train"] if isinstance(raw.get("train"), dict) else {}
    for section in (train, train.get("pretrain")):  # their data sources
        if isinstance(section, dict) and isinstance(section.get("data"), list):
            section["data"] = [_resolve_spec(d, base) for d in section["data"]]
    ev = raw.get("eval")
    if isinstance(ev, dict) and ev.get("tasks") is not None:
        tasks = _task_mapping(ev["tasks"], "eval.tasks")
        for name, task in tasks.items():
            task["path"] = _resolve(task.get("path"), base)
        ev["tasks"] = tasks


def _resolve_spec(spec: Any, base: Path) -> Any:
    if isinstance(spec, str):
        try:
            parsed = DataSpec.parse(spec)
        except ValueError:
            return spec  # reported with its key path by the validation
        return {"path": _resolve(parsed.path, base), "weight": parsed.weight, "name": parsed.name}
    if isinstance(spec, dict) and isinstance(spec.get("path"), str):
        return {**spec, "path": _resolve(spec["path"], base)}
    return spec


def _task_mapping(tasks: Any, key: str) -> dict[str, dict]:
    """eval.tasks as {name: {path, ...}}: from a mapping (name: path or name: {path, ...}) or a list of NAME[:TYPE]=PATH."""
    if isinstance(tasks, list):
        out = {}
        for spec in tasks:
            if not isinstance(spec, str) or "=" not in spec:
                raise _KeyProblem(key, f"expected NAME=PATH or NAME:TYPE=PATH entries, got {spec!r}")
            name, _, path = spec.partition("=")
            name, _, type_ = name.partition(":")
            out[name] = {"path": path, **({"type": type_} if type_ else {})}
        return out
    if not isinstance(tasks, dict):
        raise _KeyProblem(key, f"expected a mapping of task name to dataset folder, got {type(tasks).__name__}")
    return {str(name): (dict(v) if isinstance(v, dict) else {"path": v}) for name, v in tasks.items()}


def _apply_override(raw: dict, item: str) -> str:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"command line: {item!r}: expected KEY=VALUE with a dotted key, e.g. relabel.top_n=10")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"command line: {key}: value {text!r} is not valid YAML: {getattr(err, 'problem', err)}") from None
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"command line: {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value
    return key


# ---------------------------------------------------------------- validation


def _section(raw: dict, name: str) -> dict:
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _KeyProblem(name, f"expected a mapping of settings, got {type(value).__name__}")
    return dict(value)


def _build(raw: dict) -> PipelineConfig:
    top_keys = ("run_dir", "corpus", "llm", "llm_cache", "llm_options", "prices", "max_cost")
    _check_keys(raw, {*top_keys, "generate", "relabel", "train", "eval"}, "")
    for name in ("run_dir", "corpus"):
        if not raw.get(name):
            raise _KeyProblem(name, "required (a path)")
    generate, relabel, train, ev = (_section(raw, n) for n in ("generate", "relabel", "train", "eval"))

    extras = {"corpus", "limit", "sample", "lenient"}
    _check_keys(generate, extras | _field_names(GenerateConfig), "generate.", nested=GenerateConfig)
    gen_config = _validate(GenerateConfig, {k: v for k, v in generate.items() if k not in extras}, "generate")
    gen = _validate(GenerateStage, {"config": gen_config, **{k: v for k, v in generate.items() if k in extras}}, "generate")

    _check_keys(relabel, {"limit"} | _field_names(RelabelConfig), "relabel.", nested=RelabelConfig)
    rel_config = _validate(RelabelConfig, {k: v for k, v in relabel.items() if k != "limit"}, "relabel")
    rel = _validate(RelabelStage, {"config": rel_config, "limit": relabel.get("limit")}, "relabel")

    train_fields = _field_names(TrainConfig) - set(TRAIN_OWN)
    _check_keys(train, train_fields | {"data", "weight", "holdout", "holdout_max"}, "train.", nested=TrainConfig)
    specs = _data_specs(train.get("data"), "train.data")
    settings = {k: v for k, v in train.items() if k in train_fields}
    if isinstance(settings.get("pretrain"), dict):
        pretrain = {**settings["pretrain"], "data": _data_specs(settings["pretrain"].get("data"), "train.pretrain.data")}
        settings["pretrain"] = _validate(StageConfig, pretrain, "train.pretrain")
    weight = _validate(float, train.get("weight", 1.0), "train.weight")
    if weight < 0:
        raise _KeyProblem("train.weight", f"must be >= 0, got {weight}")
    # a whole TrainConfig, with a stand-in for the relabel output, checks types and ranges now
    checked = _validate(TrainConfig, {**settings, "data": [{"path": "relabeled.jsonl", "weight": weight}, *specs], "out": "."}, "train")
    holdout = _validate(float, train.get("holdout", TrainStage.holdout), "train.holdout")
    if not 0 <= holdout <= 0.5:
        raise _KeyProblem("train.holdout", f"must be a share in [0, 0.5], got {holdout}")
    holdout_max = _validate(int, train.get("holdout_max", TrainStage.holdout_max), "train.holdout_max")
    stage = TrainStage(settings={k: getattr(checked, k) for k in sorted(train_fields)}, data=tuple(specs), weight=weight,
                       holdout=holdout, holdout_max=holdout_max)

    tasks = _task_mapping(ev.pop("tasks", None) or {}, "eval.tasks")
    _check_keys(ev, _field_names(EvalStage) - {"tasks"}, "eval.")
    task_list = []
    for name, task in tasks.items():
        _check_keys(task, _field_names(EvalTask) - {"name"}, f"eval.tasks.{name}.")
        if not task.get("path"):
            raise _KeyProblem(f"eval.tasks.{name}", "needs a path (a dataset folder)")
        task_list.append(_validate(EvalTask, {"name": name, **task}, f"eval.tasks.{name}"))
    if not task_list:
        raise _KeyProblem("eval.tasks", "give at least one task, e.g. {scifact: ../shared/data/scifact}")
    evaluation = _validate(EvalStage, {**ev, "tasks": tuple(task_list)}, "eval")
    if evaluation.backend not in ("auto", "mteb", "builtin"):
        raise _KeyProblem("eval.backend", f"expected auto, mteb or builtin, got {evaluation.backend!r}")
    for task in task_list:
        _check_task(task)

    base = _validate(PipelineConfig, {k: raw[k] for k in top_keys if raw.get(k) is not None}, "")
    inputs = {"corpus": base.corpus, "generate.corpus": gen.corpus, **{f"train.data.{i}": d.path for i, d in enumerate(specs)}}
    if stage.settings.get("pretrain") is not None:
        inputs.update({f"train.pretrain.data.{i}": d.path for i, d in enumerate(stage.settings["pretrain"].data)})
    for key, value in inputs.items():
        if value is not None and not Path(value).exists():
            raise _KeyProblem(key, f"{value}: no such file or directory")
    return dataclasses.replace(base, generate=gen, relabel=rel, train=stage, eval=evaluation)


def _data_specs(items: Any, key: str) -> list[DataSpec]:
    """Training sources from PATH[:WEIGHT] / NAME=PATH[:WEIGHT] strings or DataSpec mappings."""
    if items is None:
        return []
    if not isinstance(items, list):
        raise _KeyProblem(key, f"expected a list of sources, got {type(items).__name__}")
    specs = []
    for i, spec in enumerate(items):
        try:
            spec = dataclasses.asdict(DataSpec.parse(spec)) if isinstance(spec, str) else spec
        except ValueError as err:
            raise _KeyProblem(f"{key}.{i}", str(err)) from None
        if not isinstance(spec, dict):
            raise _KeyProblem(f"{key}.{i}", "expected PATH[:WEIGHT], NAME=PATH[:WEIGHT] or a mapping with path")
        _check_keys(spec, _field_names(DataSpec), f"{key}.{i}.")
        specs.append(_validate(DataSpec, spec, f"{key}.{i}"))
    return specs


def _check_task(task: EvalTask) -> None:
    from gecko.evaluate.tasks import EvalError

    try:
        task.resolve()
    except EvalError as err:
        raise _KeyProblem(f"eval.tasks.{task.name}", str(err)) from None


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _nested_dataclass(cls, name: str):
    """The dataclass a field holds (unwrapping Optional), or None."""
    hint = typing.get_type_hints(cls).get(name)
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _check_keys(data: dict, known: set[str], prefix: str, nested=None) -> None:
    """Unknown keys are errors naming their full path, with the closest known key as a hint."""
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise _KeyProblem(f"{prefix}{key}", f"unknown key; {hint}known: {', '.join(sorted(known))}")
        inner = _nested_dataclass(nested, key) if nested is not None else None
        if inner is not None and isinstance(data[key], dict):
            _check_keys(data[key], _field_names(inner), f"{prefix}{key}.", nested=inner)


def _field_named_in(cls, loc: tuple, message: str) -> str:
    """The field a dataclass's own check complains about ("top_n must be at least 2", "unknown
    prompt style"), when the message names one: so the error points at the key, not its section."""
    for part in loc:
        cls = _nested_dataclass(cls, str(part)) if dataclasses.is_dataclass(cls) else None
    if not dataclasses.is_dataclass(cls):
        return ""
    found = []
    for f in dataclasses.fields(cls):
        for pattern in (f.name, f.name.replace("_", " ").removesuffix("s")):
            if m := re.search(rf"\b{re.escape(pattern)}", message):
                found.append((m.start(), f.name))
    return min(found)[1] if found else ""


def _validate(cls, value: Any, key: str) -> Any:
    """`value` as `cls` (types coerced as YAML would mean them); errors name the key path."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(cls).validate_python(value)
    except ValidationError as err:
        first = err.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        loc = ".".join(str(p) for p in first["loc"])
        if first["type"] == "value_error":
            loc = ".".join(p for p in (loc, _field_named_in(cls, first["loc"], message)) if p)
        path = ".".join(p for p in (key, loc) if p)
        if first["type"] not in ("value_error", "assertion_error") and "input" in first:
            message += f" (got {first['input']!r})"
        raise _KeyProblem(path or "config", message) from None
    except (ValueError, TypeError) as err:
        raise _KeyProblem(key or "config", str(err)) from None
