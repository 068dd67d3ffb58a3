"""`run_relabel`: generated queries in, (task, query, positive, hard negative) training examples out.

Per generated query: the embedder retrieves the top-N passages for `task ⊕ query`; the LLM
scores every candidate (QL and RC, one pass each); the fused ranking picks the positive (rank 1)
and the hard negative(s). Queries are processed in chunks; within a chunk each passage is sent
to the LLM once with every query that retrieved it. A query's raw scores go to the journal
(`OUT.journal`) as soon as its last candidate is scored, so kill -9 and a rerun lose nothing
and repeat no LLM call (the rest come from the LLM cache). Fusion, negative choice and the easy
filter are applied when the output is written, from the journal's raw scores: changing them
needs no LLM work.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from gecko.corpus import CorpusError, Passage, load_corpus, read_jsonl
from gecko.journal import Journal, replacing, write_json_atomic, write_jsonl_atomic
from gecko.llm.base import LLM
from gecko.llm.usage import BudgetExceeded, UsageMeter, usage_line
from gecko.options import option
from gecko.relabel.fusion import FUSIONS, NEGATIVE_METHODS, fuse, parse_weights, ranks, select_negatives, spearman
from gecko.relabel.scoring import InvalidScore, PairScore, PairScorer, ScoreConfig
from gecko.retrieve import RetrieveConfig, Retriever

REQUIRED = ("id", "seed_id", "task", "query")
SEED_RANK_BINS = ("1", "2-5", "6-10", "11-N", ">N")
POSITIVE_METHODS = ("fused", "seed")


class RelabelError(CorpusError):
    """Bad input for relabeling (the message names file and line)."""


@dataclass(frozen=True)
class RelabelConfig:
    top_n: int = option(20, "candidates retrieved and re-ranked per query")
    # the default for the packaged 270M LLM, chosen by `gecko rerank-eval` on SciFact (README):
    # RRF over QL and the retriever's ranks; its RC is no better than chance. The paper's
    # fusion="rrf" (QL + RC) is for LLMs whose relevance judgements carry signal.
    fusion: str = option("weighted", "rrf: 1/rank_QL + 1/rank_RC (the paper); ql / rc alone; weighted: sum of weight/rank "
                         "(default: weighted with ql=1,retriever=1, chosen by rerank-eval for the packaged model, see README)",
                         choices=FUSIONS)
    weights: str | None = option("ql=1,retriever=1", "for --fusion weighted (default ql=1,retriever=1), e.g. ql=1,rc=1,retriever=1")
    positive: str = option("fused", "fused: the top re-ranked candidate (the recipe); seed: the seed passage (ablation)",
                           choices=POSITIVE_METHODS)
    negative: str = option("last", "hard negative: rank N, or a random one of ranks 2..N", choices=NEGATIVE_METHODS)
    n_negatives: int = option(1, "hard negatives per example", flag="--negatives")
    seed: int = option(0, "for --negative random")
    seed_not_negative: bool = option(True, cli=False)  # the seed passage is never a negative (it is relevant by construction)
    # false-negative guard (NV-Retriever's positive-aware threshold, TopK-PercPos, and the teacher's view); None: off
    false_negative_ratio: float | None = option(
        None, "never a negative: a candidate the retriever scores above this share of the positive's score (e.g. 0.95)")
    false_negative_ql_margin: float | None = option(
        None, "never a negative: a candidate whose QL is within this many nats of the positive's")
    drop_easy_margin: float | None = option(
        None, "drop examples whose seed the base retriever ranks first by at least this cosine margin (off by default)")
    max_seed_rank: int | None = option(
        None, "drop examples whose seed the base retriever ranks below this, or not in the top-N at all: a relaxed round-trip "
        "filter (Promptagator) against queries that lost their passage (off by default)")
    # a passage retrieved by several queries of one chunk is evaluated by the LLM once for all of
    # them, so bigger chunks share more; memory per chunk is a few hundred bytes per query (its
    # top-N ids, scores and LLM scores)
    query_chunk: int = option(4096, "queries retrieved and scored together: bounds memory; passages shared within a chunk "
                              "are evaluated once")
    lenient: bool = option(False, "skip and count queries with a NaN or infinite LLM score (default: an error)")
    score: ScoreConfig = option(ScoreConfig(), cli=False)
    retrieve: RetrieveConfig = option(RetrieveConfig(), cli=False)

    def __post_init__(self):
        if self.top_n < 2:
            raise ValueError("top_n must be at least 2 (a positive and a negative)")
        for what, value, known in (("fusion", self.fusion, FUSIONS), ("positive", self.positive, POSITIVE_METHODS),
                                   ("negative method", self.negative, NEGATIVE_METHODS)):
            if value not in known:
                raise ValueError(f"unknown {what} {value!r}; known: {', '.join(known)}")
        if self.n_negatives < 1:
            raise ValueError("n_negatives must be at least 1")
        if self.false_negative_ratio is not None and not 0 < self.false_negative_ratio <= 1:
            raise ValueError("false_negative_ratio must be in (0, 1]")
        needs = {"rrf": ("ql", "rc"), "ql": ("ql",), "rc": ("rc",)}.get(self.fusion, ())
        if self.fusion == "weighted":
            needs = tuple(k for k, v in parse_weights(self.weights).items() if v and k != "retriever")
        prompt = self.score.prompt
        missing = [s for s in needs if not getattr(prompt, s)]
        if missing:
            raise ValueError(f"fusion {self.fusion!r} needs {missing}, which prompt style {self.score.prompt_style!r} does not give")


@dataclass
class Candidate:
    id: str
    retriever_rank: int
    retriever_score: float
    ql: float | None  # as `score.ql_norm` says (default: the sum over the query's tokens)
    ql_mean: float | None  # per query token, whatever ql_norm is: the training's default listwise teacher
    rc: float | None
    ql_rank: int | None
    rc_rank: int | None
    fused: float
    rank: int  # in the fused order; 1 = the positive


@dataclass
class RelabelExample:
    """One training example: a row of the output (what `gecko train` reads, plus provenance)."""

    id: str
    seed_id: str
    task_type: str | None
    task: str
    query: str
    positive: str
    negative: str | list[str]  # a list when several negatives were asked for (`gecko train` reads both)
    positive_id: str
    negative_id: str  # the first (hardest) negative
    positive_title: str
    negative_title: str | list[str]
    negative_ids: list[str]
    positive_changed: bool
    likely_false_negatives: list[str]  # candidates the false-negative guard kept from being negatives
    positive_retriever_rank: int | None  # None: the seed passage (positive="seed") was not retrieved
    seed_rank: int | None  # the seed passage's rank under the base retriever; None: not in the top-N
    seed_score: float
    seed_margin: float  # seed score minus the best other candidate's (> 0: the retriever ranks the seed first)
    fusion: str
    candidates: list[Candidate]


@dataclass
class RelabelSummary:
    queries: int = 0
    examples: int = 0
    skipped: Counter = field(default_factory=Counter)
    positive_changed: int = 0
    likely_false_negatives: int = 0  # candidates kept from being negatives by the false-negative guard
    seed_rank: dict = field(default_factory=dict)
    seed_margin: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    spearman_ql_rc: float | None = None
    pairs_scored: int = 0
    llm_calls: int = 0
    llm_cache_hits: int = 0
    tokens_in: int = 0  # prompt tokens the LLM was sent (uncached calls; as the server reports them)
    tokens_out: int = 0
    cost: float | None = None  # estimated US dollars (None: no price for this LLM)
    ql_unavailable: str | None = None  # why, when the LLM gives no query likelihood
    fusion_used: str | None = None  # the fusion applied, when it is not the configured one
    rc_bounds: dict = field(default_factory=dict)  # candidates whose RC is a bound: a label absent from a top-k list
    tokens_evaluated: int | None = None
    corpus_encoded: int = 0
    times: dict = field(default_factory=dict)
    wall_s: float = 0.0
    config: dict = field(default_factory=dict)

    @property
    def positive_changed_rate(self) -> float:
        return self.positive_changed / max(self.examples, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "skipped": dict(self.skipped), "positive_changed_rate": self.positive_changed_rate}

    def render(self) -> str:
        def q(d: dict) -> str:
            return ", ".join(f"{k} {v:+.2f}" for k, v in d.items())

        llm_s = self.times.get("llm_s", 0.0)
        lines = [
            f"queries: {self.queries}, examples written: {self.examples}"
            + (f", skipped: {dict(self.skipped)}" if self.skipped else ""),
            f"positive changed (p_1 != seed): {self.positive_changed} ({self.positive_changed_rate:.1%}; the paper saw ~15%)",
            f"likely false negatives kept out of the negatives: {self.likely_false_negatives}"
            + ("" if self.config.get("false_negative_ratio") or self.config.get("false_negative_ql_margin") else " (guard off)"),
            "seed rank under the base retriever: " + ", ".join(f"{k}: {v}" for k, v in self.seed_rank.items()),
            f"seed score margin (seed - best other): {q(self.seed_margin)}",
        ]
        for name, dist in self.scores.items():
            lines.append(f"{name}: {q(dist)}")
        if self.spearman_ql_rc is not None:
            lines.append(f"mean per-query Spearman(QL, RC): {self.spearman_ql_rc:+.3f}")
        if self.ql_unavailable:
            lines.append(f"QL unavailable ({self.ql_unavailable}): fused {self.fusion_used} instead of the configured "
                         f"{self.config.get('fusion')} {self.config.get('weights') or ''}".rstrip())
        if self.rc_bounds:
            lines.append("RC labels absent from the top log-probabilities (RC used as a bound): "
                         + ", ".join(f"{k} {v}" for k, v in self.rc_bounds.items()))
        tokens = f", {self.tokens_evaluated / self.pairs_scored:.0f} tokens evaluated per pair" if self.tokens_evaluated and self.pairs_scored else ""
        lines.append(
            f"LLM: {self.pairs_scored} pairs scored in {llm_s:.1f} s ({self.pairs_scored / max(llm_s, 1e-9):.2f} pairs/s), "
            f"{self.llm_calls} calls (+{self.llm_cache_hits} from cache){tokens}"
        )
        lines.append(usage_line(self))
        lines.append(f"corpus passages encoded: {self.corpus_encoded} (the rest from the embedding cache)")
        lines.append("time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in self.times.items()) + f"; wall {self.wall_s:.1f} s")
        return "\n".join(lines)


# ---------------------------------------------------------------- input


@dataclass(frozen=True)
class GeneratedRecord:
    id: str
    seed_id: str
    task_type: str | None
    task: str
    query: str
    where: str  # file:line, for messages


def _generated_files(path: Path) -> list[Path]:
    """The file itself, or the JSONL shards listed by the manifest of a `--engine ray` output folder."""
    if path.is_file():
        return [path]
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise RelabelError(f"{path}: no such file (nor a folder with manifest.json)")
    shards = [path / s["path"] for s in json.loads(manifest.read_text())["shards"]]
    if any(s.suffix != ".jsonl" for s in shards):
        raise RelabelError(f"{manifest}: relabel reads JSONL shards; write the generate output as NAME.jsonl")
    return shards


def load_generated(path: str | Path) -> list[GeneratedRecord]:
    """Validated records of a `gecko generate` output (a file or a sharded folder); problems raise
    `RelabelError("file:line: ...")`."""
    out: list[GeneratedRecord] = []
    seen: dict[str, str] = {}
    records = (item for file in _generated_files(Path(path)) for item in read_jsonl(file, RelabelError))
    for where, record in records:
        for name in REQUIRED:
            value = record.get(name)
            if not isinstance(value, str) or not value.strip():
                raise RelabelError(f"{where}: missing or empty field {name!r} (needs {', '.join(REQUIRED)})")
        task_type = record.get("task_type")
        if task_type is not None and not isinstance(task_type, str):
            raise RelabelError(f"{where}: field 'task_type' must be a string")
        if record["id"] in seen:
            raise RelabelError(f"{where}: duplicate id {record['id']!r} (first at {seen[record['id']]})")
        seen[record["id"]] = where
        out.append(GeneratedRecord(record["id"], record["seed_id"], task_type, record["task"], record["query"], where))
    if not out:
        raise RelabelError(f"{path}: no records")
    return out


# ---------------------------------------------------------------- helpers


def _score_key(config: RelabelConfig, llm: LLM) -> str:
    from gecko.embed import model_identity
    from gecko.models import resolve_embedder

    r = config.retrieve
    parts = {
        "llm": getattr(llm, "identity", "?"),
        "score": config.score.key(),
        "top_n": config.top_n,
        "embedder": model_identity(resolve_embedder(r.embedder)),
        "retrieve": [r.query_format, r.document_format, r.index, r.nlist, r.nprobe, r.pq_bytes, r.train_size],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{p}": round(float(np.percentile(arr, p)), 3) for p in (10, 25, 50, 75, 90)} | {"mean": round(float(arr.mean()), 3)}


def _rank_bin(rank: int | None) -> str:
    if rank is None:
        return ">N"
    return "1" if rank == 1 else "2-5" if rank <= 5 else "6-10" if rank <= 10 else "11-N"


def _norm_text(text: str) -> str:
    return " ".join(text.lower().split())


def build_example(record: GeneratedRecord, entry: dict, passages: dict[str, Passage], config: RelabelConfig,
                  fusion: str | None = None) -> tuple[RelabelExample | None, str | None, dict]:
    """Fuse one journaled query's scores into an example; (None, reason) when it cannot be one.

    Also returns the per-candidate signal ranks, for the summary. `fusion`: what the example
    names as its fusion (default `config.fusion`; `weighted:WEIGHTS` when `adapt_to_llm` changed it).
    """
    if entry.get("invalid"):
        return None, "invalid_llm_score", {}
    rows = entry["candidates"]  # [id, retriever score, *PairScore.to_list()] in retriever order
    if len(rows) < 2:
        return None, "too_few_candidates", {}
    ids = [r[0] for r in rows]
    pairs = [PairScore.from_list(r[2:]) for r in rows]
    sc = config.score
    signals = {"retriever": list(range(1, len(rows) + 1))}
    ql = [p.ql(sc.ql_norm) for p in pairs]
    rc = [p.rc(sc.rc_score) for p in pairs]
    if ql[0] is not None:
        signals["ql"] = ranks(ql, tiebreak=signals["retriever"])
    if any(v is not None for v in rc):  # None: both labels absent from a top-k list, ranked last
        signals["rc"] = ranks([-math.inf if v is None else v for v in rc], tiebreak=signals["retriever"])
    fused = fuse(signals, config.fusion, config.weights)
    order_rank = ranks(fused, tiebreak=signals["retriever"])
    order = sorted(range(len(rows)), key=lambda i: order_rank[i])
    if config.positive == "seed":  # the seed passage, whether or not it was retrieved
        positive = ids.index(record.seed_id) if record.seed_id in ids else None
        pos_p = passages[record.seed_id]
    else:
        positive = order[0]
        pos_p = passages[ids[positive]]
    pos_text = _norm_text(pos_p.text)
    exclude = {i for i in range(len(rows)) if _norm_text(passages[ids[i]].text) == pos_text}  # duplicates of p+
    if config.seed_not_negative:
        exclude |= {i for i in range(len(rows)) if ids[i] == record.seed_id}
    suspects = likely_false_negatives(rows, ql, positive, entry["seed_score"], config) - exclude
    exclude |= suspects
    rng = random.Random(f"{config.seed}:{record.id}")
    negatives = select_negatives(order, config.negative, config.n_negatives, rng, exclude)
    if not negatives:
        return None, "no_negative", signals
    unranked = [None] * len(rows)
    candidates = [
        Candidate(id=ids[i], retriever_rank=i + 1, retriever_score=round(float(rows[i][1]), 6),
                  ql=_rounded(ql[i], 4), ql_mean=_rounded(pairs[i].ql("mean"), 5), rc=_rounded(rc[i], 4),
                  ql_rank=signals.get("ql", unranked)[i], rc_rank=signals.get("rc", unranked)[i],
                  fused=round(fused[i], 6), rank=order_rank[i])
        for i in range(len(rows))
    ]
    neg_ps = [passages[ids[i]] for i in negatives]
    several = config.n_negatives > 1
    example = RelabelExample(
        id=record.id, seed_id=record.seed_id, task_type=record.task_type, task=record.task, query=record.query,
        positive=pos_p.text, negative=[p.text for p in neg_ps] if several else neg_ps[0].text,
        positive_id=pos_p.id, negative_id=neg_ps[0].id, positive_title=pos_p.title,
        negative_title=[p.title for p in neg_ps] if several else neg_ps[0].title,
        negative_ids=[ids[i] for i in negatives], positive_changed=pos_p.id != record.seed_id,
        likely_false_negatives=[ids[i] for i in sorted(suspects)],
        positive_retriever_rank=None if positive is None else positive + 1, seed_rank=entry["seed_rank"],
        seed_score=round(entry["seed_score"], 6), seed_margin=round(entry["seed_margin"], 6),
        fusion=fusion or config.fusion, candidates=candidates,
    )
    return example, None, signals


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def likely_false_negatives(rows: list, ql: list[float | None], positive: int | None, seed_score: float,
                           config: RelabelConfig) -> set[int]:
    """Candidates too close to the positive to be trusted as negatives: retriever score above
    `false_negative_ratio` x the positive's, or QL within `false_negative_ql_margin` of its QL."""
    out: set[int] = set()
    others = [i for i in range(len(rows)) if i != positive]
    if config.false_negative_ratio is not None:
        top = float(rows[positive][1]) if positive is not None else seed_score
        out |= {i for i in others if float(rows[i][1]) > config.false_negative_ratio * top}
    if config.false_negative_ql_margin is not None and positive is not None and ql[positive] is not None:
        out |= {i for i in others if ql[i] is not None and ql[i] >= ql[positive] - config.false_negative_ql_margin}
    return out


def is_easy(example: RelabelExample, margin: float) -> bool:
    """The base retriever already ranks the seed first by at least `margin`, and the LLM agrees."""
    return example.seed_rank == 1 and not example.positive_changed and example.seed_margin >= margin


def is_lost(example: RelabelExample, max_rank: int) -> bool:
    """The base retriever does not rank the query's own seed passage in its top `max_rank`: the
    query is likely about something else (a generation that drifted), whatever the LLM relabels."""
    return example.seed_rank is None or example.seed_rank > max_rank


def write_rows(out: Path, rows: list[dict]) -> None:
    """One .parquet or .jsonl file, by suffix, written beside `out` and renamed over it."""
    if out.suffix != ".parquet":
        write_jsonl_atomic(out, rows)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    with replacing(out) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)


Group = tuple[Passage, list[str]]  # a passage and every query of the chunk that retrieved it
GroupScorer = Callable[[PairScorer, list[Group], Counter], Iterable[tuple[int, list[PairScore]]]]


def score_groups_together(scorer: PairScorer, groups: list[Group], times: Counter) -> Iterator[tuple[int, list[PairScore]]]:
    """Every group of the chunk in one LLM call (for the Batch API: one job per chunk)."""
    start = time.perf_counter()
    scored = scorer.score_passages(groups)
    times["llm_s"] += time.perf_counter() - start
    yield from enumerate(scored)


def adapt_to_llm(config: RelabelConfig, llm: LLM) -> tuple[RelabelConfig, str | None]:
    """Without QL (a chat-only LLM) a fusion that uses it becomes RC + retriever, said in the
    summary and each example's `fusion`; returns (the config used, why QL is unavailable)."""
    missing = getattr(llm, "ql_missing", None)
    if not missing:
        return config, None
    weights = parse_weights(config.weights) if config.fusion == "weighted" else {}
    if config.fusion in ("rrf", "ql") or weights.get("ql"):
        config = replace(config, fusion="weighted", weights="rc=1,retriever=1")
    return config, missing


def score_groups_locally(scorer: PairScorer, groups: list[Group], times: Counter) -> Iterator[tuple[int, list[PairScore]]]:
    """The local engine: each group in one LLM call, in order; yields (group index, scores)."""
    for g, (passage, queries) in enumerate(groups):
        start = time.perf_counter()
        scored = scorer.score_passage(passage, queries)
        times["llm_s"] += time.perf_counter() - start
        yield g, scored


# ---------------------------------------------------------------- the stage


@dataclass
class ScoreStats:
    """The summary's distributions, gathered one example at a time as the output is assembled."""

    # "QL (all candidates)", "QL (positives)", "QL (negatives)", then the same for RC
    scores: dict[str, list[float]] = field(default_factory=lambda: {
        f"{signal} ({which})": [] for signal in ("QL", "RC") for which in ("all candidates", "positives", "negatives")})
    margins: list[float] = field(default_factory=list)
    rhos: list[float] = field(default_factory=list)  # per-query Spearman(QL, RC)
    seed_bins: Counter = field(default_factory=Counter)
    rc_bounds: Counter = field(default_factory=Counter)

    def add(self, example: RelabelExample, signals: dict, rows: list) -> None:
        self.seed_bins[_rank_bin(example.seed_rank)] += 1
        self.margins.append(example.seed_margin)
        if "ql" in signals and "rc" in signals:
            self.rhos.append(spearman(signals["ql"], signals["rc"]))
        for row in rows:
            bound = PairScore.from_list(row[2:]).rc_bound()
            if bound:
                self.rc_bounds[bound] += 1
        by_id = {c.id: c for c in example.candidates}
        pos, neg = by_id.get(example.positive_id), by_id[example.negative_id]  # no pos: an unretrieved seed
        for signal in ("ql", "rc"):
            name = signal.upper()
            self.scores[f"{name} (all candidates)"] += [getattr(c, signal) for c in example.candidates if getattr(c, signal) is not None]
            # an RC of None (no label listed) is no value
            if pos is not None and getattr(pos, signal) is not None and getattr(neg, signal) is not None:
                self.scores[f"{name} (positives)"].append(getattr(pos, signal))
                self.scores[f"{name} (negatives)"].append(getattr(neg, signal))

    def fill(self, summary: RelabelSummary) -> None:
        summary.seed_rank = {b: self.seed_bins.get(b, 0) for b in SEED_RANK_BINS}
        summary.seed_margin = _quantiles(self.margins)
        summary.scores = {name: _quantiles(values) for name, values in self.scores.items() if values}
        summary.spearman_ql_rc = round(float(np.mean(self.rhos)), 4) if self.rhos else None
        summary.rc_bounds = dict(self.rc_bounds)


def run_relabel(generated: str | Path, corpus: str | Path, out: str | Path, llm: LLM,
                config: RelabelConfig = RelabelConfig(), *, limit: int | None = None, progress: bool = True,
                corpus_options: dict | None = None, score_groups: GroupScorer = score_groups_locally,
                write: Callable[[Path, list[dict]], object] = write_rows) -> RelabelSummary:
    """Relabel `generated` against `corpus` into `out` (.jsonl or .parquet); resumable via OUT.journal.

    `score_groups` scores each chunk's (passage, queries) groups (`gecko.scale` sends them to
    Ray actors); `write` writes the final rows (`gecko.scale` writes shards and a manifest)."""
    started = time.perf_counter()
    times: Counter = Counter()
    out = Path(out)
    records, passage_list = _load_inputs(generated, corpus, out, limit, corpus_options)
    times["load_s"] = time.perf_counter() - started

    configured = config
    config, ql_unavailable = adapt_to_llm(config, llm)
    fusion_used = f"weighted:{config.weights}" if ql_unavailable else None
    key = _score_key(config, llm)
    meter = UsageMeter(llm)
    scorer = PairScorer(llm, config.score)
    if getattr(llm, "batch", False) and score_groups is score_groups_locally:
        score_groups = score_groups_together  # a chunk's pairs as one Batch API job
    summary = RelabelSummary(queries=len(records))
    journal = Journal(out.with_name(out.name + ".journal"))
    retriever = _score_unjournaled(records, passage_list, journal, key, scorer, score_groups, config, times, progress)
    if retriever is not None:
        rt = retriever.times
        times.update(encode_corpus_s=rt.encode_corpus_s, index_s=rt.index_s, encode_queries_s=rt.encode_queries_s, search_s=rt.search_s)
        summary.corpus_encoded = rt.corpus_encoded

    start = time.perf_counter()
    entries = {e["key"]: e for e in journal.entries() if e.get("score_key") == key}
    write(out, _assemble(records, entries, {p.id: p for p in passage_list}, config, fusion_used or config.fusion, summary))
    times["write_s"] = time.perf_counter() - start

    summary.pairs_scored = scorer.pairs
    usage = meter.used()
    summary.llm_calls, summary.llm_cache_hits = usage.calls, usage.cache_hits
    summary.tokens_in, summary.tokens_out, summary.cost = usage.tokens_in, usage.tokens_out, usage.cost
    summary.tokens_evaluated = usage.evaluated_tokens
    summary.ql_unavailable, summary.fusion_used = ql_unavailable, fusion_used
    summary.times = {k: round(v, 2) for k, v in times.items()}
    summary.wall_s = round(time.perf_counter() - started, 2)
    summary.config = {"llm": getattr(llm, "identity", "?"), "prompt_id": config.score.prompt.id,
                      **{k: v for k, v in asdict(configured).items() if k not in ("score", "retrieve")},
                      "score": asdict(config.score), "retrieve": asdict(config.retrieve)}
    write_json_atomic(out.with_name(out.name + ".summary.json"), summary.to_dict())
    return summary


def _load_inputs(generated, corpus, out: Path, limit: int | None, corpus_options: dict | None) -> tuple[list[GeneratedRecord], list[Passage]]:
    """The records to relabel and the corpus, every problem found before any LLM work."""
    if out.suffix not in (".jsonl", ".parquet"):
        raise RelabelError(f"{out}: the output must end in .jsonl or .parquet")
    records = load_generated(generated)
    if limit is not None:
        records = records[:limit]
    passage_list, _ = load_corpus(corpus, **(corpus_options or {}))
    if not passage_list:
        raise RelabelError(f"{corpus}: the corpus has no passages")
    ids = {p.id for p in passage_list}
    for r in records:
        if r.seed_id not in ids:
            raise RelabelError(f"{r.where}: seed_id {r.seed_id!r} is not a passage of the corpus {corpus}")
    return records, passage_list


def _score_unjournaled(records: list[GeneratedRecord], passage_list: list[Passage], journal: Journal, key: str,
                       scorer: PairScorer, score_groups: GroupScorer, config: RelabelConfig, times: Counter,
                       progress: bool) -> Retriever | None:
    """Retrieve and score, chunk by chunk, the queries the journal lacks; the retriever, if one was needed."""
    done = {e["key"] for e in journal.entries() if e.get("score_key") == key}
    todo = [r for r in records if r.id not in done]
    bar = tqdm(total=len(records), initial=len(records) - len(todo), unit="query", desc="relabel", disable=not progress)
    try:
        if not todo:
            return None
        retriever = Retriever(passage_list, config.retrieve, progress=progress)
        retriever.build()
        position = {p.id: i for i, p in enumerate(passage_list)}
        for lo in range(0, len(todo), config.query_chunk):
            chunk = todo[lo : lo + config.query_chunk]
            _relabel_chunk(chunk, retriever, scorer, score_groups, position, config, journal, key, times, bar)
        return retriever
    except BudgetExceeded as err:
        raise BudgetExceeded(f"relabel stopped: {err}; {len(journal)} of {len(records)} queries are journaled in "
                             f"{journal.path}: rerun with a higher max_cost to go on (cached calls cost nothing)") from None
    finally:
        bar.close()
        journal.close()


def _assemble(records: list[GeneratedRecord], entries: dict[str, dict], passages: dict[str, Passage],
              config: RelabelConfig, fusion: str, summary: RelabelSummary) -> list[dict]:
    """The output rows from the journal's raw scores; skips and statistics go into `summary`."""
    rows: list[dict] = []
    stats = ScoreStats()
    for r in records:
        example, reason, signals = build_example(r, entries[r.id], passages, config, fusion)
        if example is None:
            summary.skipped[reason] += 1
            continue
        stats.add(example, signals, entries[r.id]["candidates"])
        if config.drop_easy_margin is not None and is_easy(example, config.drop_easy_margin):
            summary.skipped["easy"] += 1
            continue
        if config.max_seed_rank is not None and is_lost(example, config.max_seed_rank):
            summary.skipped["lost seed"] += 1
            continue
        summary.examples += 1
        summary.positive_changed += example.positive_changed
        summary.likely_false_negatives += len(example.likely_false_negatives)
        rows.append(asdict(example))
    stats.fill(summary)
    return rows


def _relabel_chunk(chunk: list[GeneratedRecord], retriever: Retriever, scorer: PairScorer, score_groups: GroupScorer,
                   position: dict[str, int], config: RelabelConfig, journal: Journal, key: str, times: Counter,
                   bar) -> None:
    """Retrieve and score one chunk of queries; each query is journaled when its last pair is scored.

    A query with a score that is not finite stops the run (`InvalidScore`) or, with `lenient`,
    is journaled as invalid and skipped when the output is assembled: NaN never reaches a file."""
    q_emb = retriever.embed_queries([config.retrieve.query_text(r.task, r.query) for r in chunk])
    scores, idx = retriever.search(q_emb, config.top_n)
    seed_emb = retriever.embed_passages([position[r.seed_id] for r in chunk])
    seed_scores = (q_emb * seed_emb).sum(axis=1)
    cands = [[int(i) for i in row if i >= 0] for row in idx]
    found = [{i: s for i, s in zip(row_ids, row_scores)} for row_ids, row_scores in zip(idx.tolist(), scores.tolist())]
    groups: dict[int, list[int]] = {}
    for q, ids in enumerate(cands):
        for i in ids:
            groups.setdefault(i, []).append(q)
    remaining = [set(ids) for ids in cands]
    results: list[dict[int, PairScore]] = [{} for _ in chunk]

    def finish(q: int) -> None:
        r, ids = chunk[q], cands[q]
        seed = position[r.seed_id]
        seed_rank = ids.index(seed) + 1 if seed in ids else None
        seed_score = float(seed_scores[q])
        others = [found[q][i] for i in ids if i != seed]
        margin = seed_score - (max(others) if others else seed_score)
        entry = {"score_key": key,
                 "candidates": [[retriever.passages[i].id, float(found[q][i]), *results[q][i].to_list()] for i in ids],
                 "seed_rank": seed_rank, "seed_score": seed_score, "seed_margin": margin}
        problems = ((retriever.passages[i].id, results[q][i].not_finite()) for i in ids)
        invalid = next((f"query {r.id!r}, passage {pid!r}: {what}" for pid, what in problems if what), None)
        if invalid and not config.lenient:
            raise InvalidScore(f"{getattr(scorer.llm, 'identity', '?')} gave a score that is not finite ({invalid}); "
                               f"lenient: true skips and counts such queries")
        if invalid:
            entry.update(candidates=[], invalid=invalid)
        journal.add(r.id, entry)
        bar.update(1)

    for q, ids in enumerate(cands):
        if not ids:
            finish(q)
    order = list(groups)  # passages in the order the chunk's queries first retrieved them
    batch = [(retriever.passages[i], [chunk[m].query for m in groups[i]]) for i in order]
    for g, scored in score_groups(scorer, batch, times):
        i = order[g]
        for m, s in zip(groups[i], scored):
            results[m][i] = s
            remaining[m].discard(i)
            if not remaining[m]:
                finish(m)
