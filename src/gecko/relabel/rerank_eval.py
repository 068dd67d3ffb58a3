"""`gecko rerank-eval`: how much the LLM's QL, RC and their fusion improve a retriever's top-N.

On a BEIR dataset: retrieve the top-N of each judged query with the embedder, score every
(query, candidate) pair with the LLM, and report nDCG@10 of the retriever's order against the
orders by QL, by RC, by RRF(QL, RC) and by weighted RRF with the retriever (the paper's
Appendix A: retriever 51.3 -> +QL 52.8 / +RC 54.1 / +RRF 56.8 on BEIR with a large LLM).
The dataset is read and scored by `gecko eval`'s rules (`gecko.evaluate.tasks`): a query's own
document is left out of its candidates where that applies, and qrels naming documents the corpus
lacks stay in the ideal ranking.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gecko.evaluate.core import as_tasks
from gecko.evaluate.metrics import paired_bootstrap_ci, ranking_scores
from gecko.evaluate.tasks import load_task_data, resolve_task
from gecko.llm.base import LLM
from gecko.llm.usage import UsageMeter
from gecko.relabel.fusion import fuse, ranks, spearman
from gecko.relabel.scoring import InvalidScore, PairScore, PairScorer, ScoreConfig
from gecko.retrieve import RetrieveConfig, Retriever

# the orders compared: name -> (fusion method, weights)
ORDERS = {
    "retriever": ("weighted", {"retriever": 1.0}),
    "+QL": ("ql", None),
    "+RC": ("rc", None),
    "+RRF(QL,RC)": ("rrf", None),
    "+RRF(QL,RC,retriever)": ("weighted", {"ql": 1.0, "rc": 1.0, "retriever": 1.0}),
    "+RRF(QL,retriever)": ("weighted", {"ql": 1.0, "retriever": 1.0}),
}


@dataclass
class RerankEvalResult:
    dataset: str
    queries: int
    top_n: int
    ndcg_at_10: dict[str, float]
    precision_at_1: dict[str, float]  # share of queries whose top candidate is judged relevant (the positive)
    recall_at_n: float
    oracle_ndcg_at_10: float  # best order of the top-N: the ceiling of any reranker
    spearman: dict[str, float]  # mean over queries of the per-query rank correlation
    top1_changed: dict[str, float]  # share of queries whose top candidate differs from the retriever's
    pairs: int
    llm_calls: int
    llm_cache_hits: int
    tokens_evaluated: int | None
    times: dict[str, float] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    query_ids: list[str] = field(default_factory=list)
    per_query_ndcg_at_10: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def paired_ci(self, name: str, against: str = "retriever", samples: int = 10_000, seed: int = 0) -> tuple[float, float]:
        """95% paired-bootstrap interval of mean nDCG@10(name) - nDCG@10(against), over queries."""
        return paired_bootstrap_ci(self.per_query_ndcg_at_10[name], self.per_query_ndcg_at_10[against], samples, seed)

    def table(self) -> str:
        lines = ["| order | nDCG@10 | Δ vs retriever (95% CI) | P@1 | top-1 changed |", "|---|---|---|---|---|"]
        for name, value in self.ndcg_at_10.items():
            changed = self.top1_changed.get(name)
            delta = ""
            if name != "retriever" and name in self.per_query_ndcg_at_10 and "retriever" in self.per_query_ndcg_at_10:
                lo, hi = self.paired_ci(name)
                delta = f"{100 * (value - self.ndcg_at_10['retriever']):+.2f} ({100 * lo:+.1f}, {100 * hi:+.1f})"
            p1 = self.precision_at_1.get(name)
            lines.append(
                f"| {name} | {100 * value:.2f} | {delta} | {'' if p1 is None else f'{100 * p1:.1f}'} "
                f"| {'' if changed is None else f'{100 * changed:.1f}%'} |"
            )
        return "\n".join(lines)

    def render(self) -> str:
        pairs_s = self.pairs / max(self.times.get("llm_s", 0.0), 1e-9)
        lines = [
            f"{self.dataset}: {self.queries} queries, top-{self.top_n} (recall@{self.top_n} {100 * self.recall_at_n:.1f}, "
            f"oracle nDCG@10 {100 * self.oracle_ndcg_at_10:.2f})",
            self.table(),
            "mean per-query Spearman: " + ", ".join(f"{k} {v:+.3f}" for k, v in self.spearman.items()),
            f"LLM: {self.pairs} pairs, {self.llm_calls} calls (+{self.llm_cache_hits} cached), {pairs_s:.2f} pairs/s"
            + (f", {self.tokens_evaluated / max(self.pairs, 1):.0f} tokens evaluated per pair" if self.tokens_evaluated else ""),
            "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.times.items()),
        ]
        return "\n".join(lines)


def run_rerank_eval(dataset: str | Path, llm: LLM, *, top_n: int = 20, limit: int | None = None, split: str = "test",
                    score: ScoreConfig = ScoreConfig(),
                    retrieve: RetrieveConfig = RetrieveConfig(query_format="{query}"), progress: bool = True,
                    ignore_identical_ids: bool | None = None, strict: bool | None = None) -> RerankEvalResult:
    """nDCG@10 of the retriever alone and re-ranked by QL / RC / fusions over its top-N.

    `limit` keeps the first N judged queries (in qrels order) to bound the LLM's cost.
    `ignore_identical_ids` / `strict`: as `gecko eval`'s (`RetrievalTask`; None: its rule, the task
    named after the folder); a query whose own document is left out still gets N candidates.
    """
    times: dict[str, float] = {}
    start = time.perf_counter()
    (task,) = as_tasks(resolve_task(Path(dataset).name, dataset, type="retrieval", split=split),
                       ignore_identical_ids=ignore_identical_ids, strict=strict)
    data = load_task_data(task)
    for line in data.notes(task.name):
        print(f"gecko rerank-eval: {line}", file=sys.stderr)
    qids = list(data.qrels)[: limit if limit is not None else None]
    times["load_s"] = time.perf_counter() - start

    cands = _retrieve(data, qids, top_n, retrieve, progress, times)
    meter = UsageMeter(llm)
    start = time.perf_counter()
    pair_scores = _score_pairs(PairScorer(llm, score), data, cands, progress)
    times["llm_s"] = time.perf_counter() - start
    ranked, rhos = _rerank(data, cands, pair_scores, score)
    qrels = {q: data.qrels[q] for q in qids}
    usage = meter.used()
    return RerankEvalResult(
        dataset=str(dataset), queries=len(qids), top_n=top_n, **_metrics(ranked, qrels, top_n),
        spearman={k: float(np.mean(v)) for k, v in rhos.items() if v}, pairs=len(pair_scores), llm_calls=usage.calls,
        llm_cache_hits=usage.cache_hits, tokens_evaluated=usage.evaluated_tokens,
        times={k: round(v, 2) for k, v in times.items()}, query_ids=qids,
        config={"llm": getattr(llm, "identity", "?"), "score": {**asdict(score), "prompt_id": score.prompt.id},
                "retrieve": asdict(retrieve), "split": split, "limit": limit, "protocol": data.protocol()},
    )


def _retrieve(data, qids: list[str], top_n: int, retrieve: RetrieveConfig, progress: bool, times: dict) -> dict[str, list[int]]:
    """Each query's top-N corpus positions; a query's own document is left out where the task says so."""
    retriever = Retriever(data.corpus, retrieve, progress=progress)
    q_emb = retriever.embed_queries([retrieve.query_text("", data.queries[q]) for q in qids])
    _, idx = retriever.search(q_emb, top_n + 1 if data.ignore_identical_ids else top_n)
    times.update(encode_corpus_s=retriever.times.encode_corpus_s, index_s=retriever.times.index_s,
                 encode_queries_s=retriever.times.encode_queries_s, search_s=retriever.times.search_s)
    return {
        q: [int(i) for i in row if i >= 0 and not (data.ignore_identical_ids and data.corpus[i].doc_id == q)][:top_n]
        for q, row in zip(qids, idx)
    }


def _score_pairs(scorer: PairScorer, data, cands: dict[str, list[int]], progress: bool) -> dict[tuple[str, int], PairScore]:
    """Every (query, candidate) pair's scores, grouped by passage: a passage retrieved by several
    queries is evaluated once. A score that is not finite is an `InvalidScore`."""
    by_passage: dict[int, list[str]] = {}
    for q, ids in cands.items():
        for i in ids:
            by_passage.setdefault(i, []).append(q)
    pair_scores: dict[tuple[str, int], PairScore] = {}
    with tqdm(total=sum(len(v) for v in by_passage.values()), unit="pair", desc="LLM scoring", disable=not progress) as bar:
        for i, queries in by_passage.items():
            for q, s in zip(queries, scorer.score_passage(data.corpus[i], [data.queries[q] for q in queries])):
                if s.not_finite():
                    raise InvalidScore(f"{getattr(scorer.llm, 'identity', '?')} gave a score that is not finite "
                                       f"(query {q!r}, document {data.corpus[i].doc_id!r}: {s.not_finite()})")
                pair_scores[(q, i)] = s
            bar.update(len(queries))
    return pair_scores


def _rerank(data, cands: dict[str, list[int]], pair_scores: dict[tuple[str, int], PairScore],
            score: ScoreConfig) -> tuple[dict[str, dict[str, list[str]]], dict[str, list[float]]]:
    """Each order's ranked document ids per query, and the per-query rank correlations of the signals."""
    ranked: dict[str, dict[str, list[str]]] = {name: {} for name in ORDERS}
    pairs_compared = {"QL~RC": ("ql", "rc"), "QL~retriever": ("ql", "retriever"), "RC~retriever": ("rc", "retriever")}
    rhos: dict[str, list[float]] = {name: [] for name in pairs_compared}
    for q, ids in cands.items():
        pairs = [pair_scores[(q, i)] for i in ids]
        signals = {"retriever": list(range(1, len(ids) + 1))}
        if score.prompt.ql:
            signals["ql"] = ranks([p.ql(score.ql_norm) for p in pairs], tiebreak=signals["retriever"])
        if score.prompt.rc:
            signals["rc"] = ranks([p.rc(score.rc_score) for p in pairs], tiebreak=signals["retriever"])
        for name, (method, weights) in ORDERS.items():
            needed = {"ql": ["ql"], "rc": ["rc"], "rrf": ["ql", "rc"]}.get(method, list(weights or {}))
            if not all(s in signals for s in needed):
                continue
            order = ranks(fuse(signals, method, weights), tiebreak=signals["retriever"])
            docs = [None] * len(ids)
            for pos, r in enumerate(order):
                docs[r - 1] = data.corpus[ids[pos]].doc_id
            ranked[name][q] = list(dict.fromkeys(docs))
        for pair, (a, b) in pairs_compared.items():
            if a in signals and b in signals:
                rhos[pair].append(spearman(signals[a], signals[b]))
    return ranked, rhos


def _metrics(ranked: dict[str, dict[str, list[str]]], qrels: dict[str, dict[str, int]], top_n: int) -> dict:
    """nDCG@10, P@1 (is the positive judged relevant), per-query nDCG@10, recall@N, the oracle's
    nDCG@10 and how often the top candidate changed, for `RerankEvalResult`."""
    qids = list(qrels)
    orders = {name: r for name, r in ranked.items() if r}
    base = ranking_scores(ranked["retriever"], qrels, (10, top_n))
    oracle = {q: sorted(ranked["retriever"][q], key=lambda d: -qrels[q].get(d, 0)) for q in qids}
    return {
        "ndcg_at_10": {name: ranking_scores(r, qrels, (10, top_n))["ndcg_at_10"] for name, r in orders.items()},
        "precision_at_1": {name: ranking_scores(r, qrels, (1,))["precision_at_1"] for name, r in orders.items()},
        "per_query_ndcg_at_10": {
            name: [round(ranking_scores({q: r[q]}, {q: qrels[q]}, (10,))["ndcg_at_10"], 6) for q in qids]
            for name, r in orders.items()
        },
        "recall_at_n": base[f"recall_at_{top_n}"],
        "oracle_ndcg_at_10": ranking_scores(oracle, qrels, (10,))["ndcg_at_10"],
        "top1_changed": {
            name: float(np.mean([r[q][0] != ranked["retriever"][q][0] for q in qids]))
            for name, r in orders.items() if name != "retriever"
        },
    }
