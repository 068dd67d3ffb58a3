"""`--engine ray`: the local stages' driver logic, with their per-batch LLM work on Ray Data actors.

The driver runs `run_generate` / `run_relabel` unchanged (corpus checks, journal, retrieval,
fusion, summary) and swaps two things: the batches go to an actor pool (`map_batches` with an
actor class that holds one LLM, loaded once), and the output is written as shards plus a
manifest. The actors call the local stage's own per-batch functions (`generate_batch`,
`PairScorer.score_passage`) on the same batches the local engine would form, so the records are
the same as the local engine's (same ids; same content wherever the LLM is deterministic per
prompt: temperature 0, or the per-prompt seeds llama.cpp already uses).

Faults: an actor that dies (kill -9, OOM, node loss) is restarted and its unfinished batches
run again: Ray Data's actor pools default to `max_restarts=-1` and `max_task_retries=-1` (set
through `ray_remote_args`, deprecated since Ray 2.60, so gecko keeps the defaults). The driver
journals each item when its batch returns and checks at the end that every item came back
exactly once.

LLM cache: no SQLite file is shared across machines (SQLite's locking and WAL are unsafe over
NFS). Each actor caches in memory and sends the entries it computed back with its batch
result; the driver merges them into its own cache file (`GECKO_LLM_CACHE` or the default) as
results arrive. Keys are content addresses, so merging is idempotent, and a later local run
(another fusion, rerank-eval) reuses every call. Limits: actors do not read the driver's cache
(a rerun skips finished items through the journal instead, so only batches in flight when the
driver died are recomputed), and a killed actor's batch in flight is recomputed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from gecko.corpus import Passage
from gecko.generate import GenerateConfig, GenerateSummary, derive_seed, generate_batch, run_generate
from gecko.journal import write_json_atomic
from gecko.llm import LLMError, LLMSpec, Price, default_cache_path
from gecko.llm.cache import CachedLLM, LLMCache
from gecko.llm.usage import BudgetExceeded, check_budget, price_for
from gecko.models import DEFAULT, sha256_of
from gecko.relabel.run import Group, RelabelConfig, RelabelSummary, run_relabel, write_rows
from gecko.relabel.scoring import PairScore, PairScorer, ScoreConfig

COUNTERS = ("backend_calls", "cache_hits", "tokens_in", "tokens_out", "batch_tokens_in", "batch_tokens_out", "evaluated_tokens")
FORMATS = (".jsonl", ".parquet")
ADAPTED = ("chat", "ql_missing", "rc_missing")  # what the stages read off the LLM to adapt to it


class ScaleError(LLMError):
    """The LLM work cannot run on the cluster or lost items (Ray missing, no cluster, an item never
    came back); an LLMError, so the CLI reports it like any other LLM failure."""


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS or a local Ray started for this run; "auto": the running cluster
    actors: int | None = None  # LLM actors; None: as many as the cluster's CPUs (or GPUs) allow
    num_cpus: float = 1.0  # per actor; llama.cpp gets this many threads
    num_gpus: float = 0.0  # per actor (llama.cpp built with CUDA)
    batch_size: int = 8  # relabel: (passage, queries) groups per actor call; generate uses GenerateConfig.batch_size
    shard_size: int = 100_000  # records per output shard
    llm_options: dict = field(default_factory=dict)  # extra backend options, e.g. {"max_concurrency": 16} for openai


# ---------------------------------------------------------------- actors


class _Recorder:
    """The actors' cache: holds what the current batch computed until it is sent to the driver."""

    def __init__(self):
        self.fresh: dict[str, object] = {}

    def get_many(self, keys) -> dict[str, object]:
        return {k: self.fresh[k] for k in keys if k in self.fresh}

    def put_many(self, items: dict[str, object]) -> None:
        self.fresh.update(items)


def _open_llms(specs: list[str], identity: str | None, options: dict) -> list[CachedLLM]:
    """One cached backend per spec (several: one per vLLM server), all under one identity."""
    from gecko.llm import open_backend

    recorder = _Recorder()
    llms = []
    for spec in specs:
        backend = open_backend(spec, **options)
        if identity is not None:
            backend.identity = identity  # several servers of one model: same keys, same records
        llms.append(CachedLLM(backend, recorder))
    return llms


class _Worker:
    """Holds the LLM(s) for the actor's lifetime; results carry the new cache entries and counters."""

    def __init__(self, specs: list[str], identity: str | None, options: dict):
        self.llms = _open_llms(specs, identity, options)
        self.recorder = self.llms[0].cache
        self.seen = {c: 0 for c in COUNTERS}

    def pick(self, key: str) -> CachedLLM:
        """Spreads batches over the servers by a hash of their first item (stable across retries)."""
        return self.llms[derive_seed(key) % len(self.llms)]

    def drain(self) -> dict:
        now = {c: sum(getattr(llm, c, 0) or 0 for llm in self.llms) for c in COUNTERS}
        stats = {c: now[c] - self.seen[c] for c in COUNTERS}
        self.seen = now
        cache, self.recorder.fresh = self.recorder.fresh, {}
        return {"stats": stats, "cache": cache}


class _GenerateWorker(_Worker):
    def __init__(self, specs: list[str], identity: str | None, options: dict, config: GenerateConfig):
        super().__init__(specs, identity, options)
        self.config = config

    def __call__(self, batch: dict) -> dict:
        out = []
        for payload in batch["passages"]:
            passages = [Passage(*p) for p in json.loads(payload)]
            entries = generate_batch(passages, self.pick(passages[0].id), self.config)
            out.append(json.dumps({"entries": entries, **self.drain()}, ensure_ascii=False))
        return {"result": out}


class _ScoreWorker(_Worker):
    def __init__(self, specs: list[str], identity: str | None, options: dict, config: ScoreConfig):
        super().__init__(specs, identity, options)
        self.scorers = {id(llm): PairScorer(llm, config) for llm in self.llms}

    def __call__(self, batch: dict) -> dict:
        scores = {}
        for g, payload in zip(batch["g"], batch["group"]):
            passage, queries = json.loads(payload)
            passage = Passage(*passage)
            scored = self.scorers[id(self.pick(passage.id))].score_passage(passage, queries)
            scores[int(g)] = [s.to_list() for s in scored]
        return {"result": [json.dumps({"scores": scores, **self.drain()}, ensure_ascii=False)]}


def _probe(specs: list[str], options: dict) -> dict:
    """Runs on the cluster: opens the backend where the actors will; its identity, served model name
    and what the stages adapt to (a chat-only server: the chat prompt, no QL)."""
    backend = _open_llms(specs[:1], None, options)[0].backend
    return {"identity": backend.identity, "model": getattr(backend, "model", None),
            **{name: getattr(backend, name, None) for name in ADAPTED}}


# ---------------------------------------------------------------- the driver side


def _llm_specs(spec: str) -> list[str]:
    """`openai:URL1,URL2#MODEL` → one spec per server; any other spec stays one."""
    parsed = LLMSpec.parse(spec)
    return [f"openai:{url}#{parsed.model}" for url in parsed.urls] if parsed.kind == "openai" else [spec]


def _backend_options(spec: str, config: RayConfig) -> dict:
    local = LLMSpec.parse(spec).kind in (DEFAULT, "llamacpp")
    return ({"n_threads": max(1, int(config.num_cpus))} if local else {}) | config.llm_options


class _Cluster:
    """The connection, the LLM's identity and the actor pool settings for one run."""

    def __init__(self, spec: str, config: RayConfig, cache: Path, prices: dict[str, Price] | None = None,
                 max_cost: float | None = None):
        import ray

        self.ray = ray
        self.config = config
        self.options = _backend_options(spec, config)
        self.specs = _llm_specs(spec)
        if not self.specs:
            raise ScaleError(f"--llm {spec!r}: no server URL")
        resources = {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus}
        probed = ray.get(ray.remote(**resources, max_retries=3)(_probe).remote(self.specs, self.options))
        identity, model = probed["identity"], probed["model"]
        if len(self.specs) > 1:  # the model name the first server reported, for every server
            mode = identity.partition("#")[2].removeprefix(model)  # "@chat" / "@chat-rc": what the probe chose
            urls = LLMSpec.parse(spec).urls
            self.specs = [f"openai:{url}#{model}" for url in urls]
            identity = f"openai:{','.join(urls)}#{model}{mode}"
        self.identity = identity
        self.llm = _RemoteLLM(identity, model, prices or {}, max_cost)
        for name in ADAPTED:
            setattr(self.llm, name, probed[name])
        self.cache = LLMCache(cache)
        self.duplicates = 0
        available = ray.cluster_resources()
        if config.actors:
            self.actors = config.actors
        elif config.num_gpus:
            self.actors = max(1, int(available.get("GPU", 0) // config.num_gpus))
        else:
            self.actors = max(1, int(available.get("CPU", 1) // max(config.num_cpus, 1e-6)))

    def run(self, rows: list[dict], worker: type, extra: dict, batch_size: int) -> Iterator[dict]:
        """Rows through a pool of `worker` actors; yields each batch's result once its batch is done."""
        if not rows:
            return
        ray = self.ray
        c = self.config
        ds = ray.data.from_items(rows).map_batches(
            worker,
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(self.actors, len(rows))),
            fn_constructor_kwargs={"specs": self.specs, "identity": self.identity, "options": self.options, **extra},
            num_cpus=c.num_cpus,
            num_gpus=c.num_gpus,
        )
        for row in ds.iter_rows():
            result = json.loads(row["result"])
            self.cache.put_many(result.pop("cache"))
            self.llm.add(result.pop("stats"))
            yield result  # journaled by the stage before the budget may stop it
            self.llm.check_budget()

    def settings(self) -> dict:
        return {"kind": "ray", "actors": self.actors, **{k: v for k, v in asdict(self.config).items() if k != "actors"}}


class _RemoteLLM:
    """The driver's stand-in for the actors' LLM: its identity (keys, records), what the probe found
    (`ADAPTED`), summed counters and the estimated cost of their tokens. Past `max_cost` the stage
    stops once the batch that passed it is journaled (the actors' batches run concurrently: a check
    before each call, as locally, would need the driver in every call)."""

    def __init__(self, identity: str, model: str | None, prices: dict[str, Price], max_cost: float | None):
        self.identity, self.model, self.max_cost = identity, model, max_cost
        self.price = price_for(prices, self)
        check_budget(max_cost, self.price, self)
        for name in COUNTERS:
            setattr(self, name, 0)
        self.cost = 0.0 if self.price is not None else None

    def add(self, stats: dict[str, int]) -> None:
        for name, value in stats.items():
            setattr(self, name, getattr(self, name) + value)
        if self.price is not None:
            self.cost += self.price.cost(stats["tokens_in"], stats["tokens_out"], stats["batch_tokens_in"], stats["batch_tokens_out"])

    def check_budget(self) -> None:
        if self.max_cost is not None and self.cost >= self.max_cost:
            raise BudgetExceeded(f"the budget is spent: estimated ${self.cost:.4f} of max_cost ${self.max_cost:g}")


def _check_complete(what: str, expected: set, seen: set) -> None:
    missing = expected - seen
    if missing:
        raise ScaleError(f"{len(missing)} {what} never came back from the actors (e.g. {sorted(missing)[:3]}); "
                         "the rest is journaled: rerun the same command to finish")


@dataclass
class _GenerateOnRay:
    """`run_generate`'s engine: the local engine's batches, one per actor call."""

    cluster: _Cluster

    def __call__(self, passages: list[Passage], llm, config: GenerateConfig) -> Iterator[dict[str, dict]]:
        size = config.batch_size
        rows = [{"passages": json.dumps([[p.id, p.doc_id, p.title, p.text] for p in passages[lo : lo + size]], ensure_ascii=False)}
                for lo in range(0, len(passages), size)]
        seen: set[str] = set()
        for result in self.cluster.run(rows, _GenerateWorker, {"config": config}, batch_size=1):
            entries = {k: v for k, v in result["entries"].items() if k not in seen}
            self.cluster.duplicates += len(result["entries"]) - len(entries)
            seen |= entries.keys()
            yield entries
        _check_complete("passages", {p.id for p in passages}, seen)


@dataclass
class _ScoreOnRay:
    """`run_relabel`'s group scorer: each (passage, queries) group is one row, never split."""

    cluster: _Cluster

    def __call__(self, scorer: PairScorer, groups: list[Group], times: Counter) -> Iterator[tuple[int, list[PairScore]]]:
        start = time.perf_counter()
        rows = [{"g": g, "group": json.dumps([[p.id, p.doc_id, p.title, p.text], queries], ensure_ascii=False)}
                for g, (p, queries) in enumerate(groups)]
        extra = {"config": scorer.config}
        seen: set[int] = set()
        for result in self.cluster.run(rows, _ScoreWorker, extra, batch_size=self.cluster.config.batch_size):
            for g, scores in result["scores"].items():
                if int(g) in seen:
                    self.cluster.duplicates += 1
                    continue
                seen.add(int(g))
                scorer.pairs += len(scores)
                yield int(g), [PairScore.from_list(s) for s in scores]
        times["llm_s"] += time.perf_counter() - start
        _check_complete("passage groups", set(range(len(groups))), seen)


@dataclass
class _ShardWriter:
    """Writes the final records as `OUT/part-NNNNN.{jsonl,parquet}` plus `OUT/manifest.json`.

    JSONL shards hold exactly the lines of the local engine's file, in order: concatenated, they
    are that file. The folder is built beside OUT and swapped in, and the manifest is written
    last, so a reader that trusts the manifest never sees a partial output."""

    stage: str
    cluster: _Cluster
    config: dict

    def __call__(self, out: Path, records: list[dict]) -> None:
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        _remove(tmp)
        tmp.mkdir(parents=True)
        shards = []
        size = self.cluster.config.shard_size
        for n, lo in enumerate(range(0, len(records), size)):
            path = tmp / f"part-{n:05d}{out.suffix}"
            chunk = records[lo : lo + size]
            write_rows(path, chunk)
            shards.append({"path": path.name, "records": len(chunk), "sha256": sha256_of(path)})
        write_json_atomic(tmp / "manifest.json", {
            "stage": self.stage,
            "format": out.suffix.lstrip("."),
            "records": len(records),
            "shards": shards,
            "llm": self.cluster.identity,
            "config": self.config,
            "engine": self.cluster.settings(),
            "duplicate_results_dropped": self.cluster.duplicates,
        })
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@contextmanager
def _on_cluster(out: Path, llm: str, config: RayConfig, cache: str | Path | None, progress: bool,
                prices: dict[str, Price] | None, max_cost: float | None) -> Iterator[_Cluster]:
    """Joins the cluster (or starts a local Ray, stopped again at the end); the run's `_Cluster` on it."""
    if out.suffix not in FORMATS:
        raise ScaleError(f"{out}: with --engine ray the output is a folder of shards named NAME.jsonl or NAME.parquet")
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise ScaleError("--engine ray needs Ray: pip install 'gecko[ray]'") from err
    started = not ray.is_initialized()
    if started:
        local = config.address is None and not os.environ.get("RAY_ADDRESS")
        try:
            ray.init(address=config.address, **({"include_dashboard": False} if local else {}))
        except ConnectionError as err:
            raise ScaleError(f"cannot reach the Ray cluster at {config.address or os.environ.get('RAY_ADDRESS')}: {err}") from err
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = progress
    try:
        yield _Cluster(llm, config, Path(cache or default_cache_path()), prices, max_cost)
    finally:
        if started:
            ray.shutdown()


def run_generate_ray(
    corpus: str | Path,
    out: str | Path,
    llm: str = DEFAULT,
    config: GenerateConfig = GenerateConfig(),
    ray_config: RayConfig = RayConfig(),
    *,
    cache: str | Path | None = None,
    limit: int | None = None,
    sample: int | None = None,
    lenient: bool = False,
    progress: bool = True,
    prices: dict[str, Price] | None = None,
    max_cost: float | None = None,
) -> GenerateSummary:
    """`run_generate` with the LLM on Ray actors; `out` (NAME.jsonl or NAME.parquet) becomes a shard folder.

    `llm` is a spec (`default`, `llamacpp:PATH`, `openai:URL[,URL...]#MODEL`): each actor opens it.
    `prices` (by model name) and `max_cost` as in `load_llm`: the cost is estimated on the driver."""
    out = Path(out)
    with _on_cluster(out, llm, ray_config, cache, progress, prices, max_cost) as cluster:
        writer = _ShardWriter("generate", cluster, {"corpus": str(corpus), "limit": limit, "sample": sample, **asdict(config)})
        return run_generate(corpus, out, cluster.llm, config, limit=limit, lenient=lenient, progress=progress, sample=sample,
                            engine=_GenerateOnRay(cluster), write=writer)


def run_relabel_ray(
    generated: str | Path,
    corpus: str | Path,
    out: str | Path,
    llm: str = DEFAULT,
    config: RelabelConfig = RelabelConfig(),
    ray_config: RayConfig = RayConfig(),
    *,
    cache: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
    corpus_options: dict | None = None,
    prices: dict[str, Price] | None = None,
    max_cost: float | None = None,
) -> RelabelSummary:
    """`run_relabel` with retrieval on the driver and the LLM scoring on Ray actors; `out` becomes a
    shard folder. Each `config.query_chunk` of queries is one Ray Data run (actors load the LLM
    once per chunk), so on a cluster a large chunk amortises that start-up."""
    out = Path(out)
    with _on_cluster(out, llm, ray_config, cache, progress, prices, max_cost) as cluster:
        writer = _ShardWriter("relabel", cluster, {"generated": str(generated), "corpus": str(corpus), "limit": limit,
                                                    **asdict(config)})
        return run_relabel(generated, corpus, out, cluster.llm, config, limit=limit, progress=progress,
                           corpus_options=corpus_options, score_groups=_ScoreOnRay(cluster), write=writer)
