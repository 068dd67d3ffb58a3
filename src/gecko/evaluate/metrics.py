"""Built-in scorers that follow MTEB's definitions, for when the optional `mteb` package is absent.

Each takes L2-normalised embeddings and returns a flat dict of scores named as in MTEB's
results files (0-1 scale): retrieval as pytrec_eval computes it (ndcg_cut, map_cut, recall, P)
plus MTEB's MRR and hit rate; STS correlations of cosine / Manhattan / Euclidean scores;
classification as MTEB's AbsTaskClassification (undersampled train, logistic regression, averaged
over experiments). `tests/test_eval.py` checks them against mteb itself where it is installed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable

import numpy as np


def retrieval_scores(
    query_ids: list[str],
    query_emb: np.ndarray,
    doc_ids: list[str],
    doc_emb: np.ndarray,
    qrels: dict[str, dict[str, int]],
    k_values=(1, 3, 5, 10, 20, 100, 1000),
    ignore_identical_ids: bool = False,
) -> dict[str, float]:
    """Exact cosine search of every query over the whole corpus, scored against `qrels` (means).

    `ignore_identical_ids` drops a query's own document from its top-k afterwards, as mteb does
    (so that query's ranking is one shorter when its document was in the top-k)."""
    ranked = exact_ranking(query_ids, query_emb, doc_ids, doc_emb, max(k_values))
    if ignore_identical_ids:
        ranked = {qid: [doc for doc in docs if doc != qid] for qid, docs in ranked.items()}
    return ranking_scores(ranked, qrels, k_values)


def exact_ranking(
    query_ids: list[str], query_emb: np.ndarray, doc_ids: list[str], doc_emb: np.ndarray, top_k: int, chunk: int = 256
) -> dict[str, list[str]]:
    """Each query's top-k documents by inner product, in pytrec_eval / MTEB order."""
    top_k = min(top_k, len(doc_ids))
    ranked = {}
    order_ids = np.array(doc_ids, dtype=object)
    for start in range(0, len(query_ids), chunk):
        sims = query_emb[start : start + chunk] @ doc_emb.T
        if top_k < sims.shape[1]:
            part = np.argpartition(-sims, top_k - 1, axis=1)[:, :top_k]
        else:
            part = np.tile(np.arange(sims.shape[1]), (sims.shape[0], 1))
        for row, qid in enumerate(query_ids[start : start + chunk]):
            cand = part[row]
            # score descending, ties by document id descending
            items = sorted(zip(sims[row, cand].tolist(), order_ids[cand].tolist()), reverse=True)
            ranked[qid] = [doc for _, doc in items]
    return ranked


def ranking_scores(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]], k_values) -> dict[str, float]:
    """Mean per-query metrics over the queries that have qrels (trec_eval's definitions)."""
    return _means(ranking_per_query(ranked, qrels, k_values))


def _means(per: dict[str, list[float]]) -> dict[str, float]:
    return {name: float(np.mean(values)) for name, values in per.items()}


def paired_bootstrap_ci(a, b, samples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% paired-bootstrap interval of mean(a) - mean(b) over the same queries."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def ranking_per_query(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]], k_values) -> dict[str, list[float]]:
    """Each metric per query that has qrels, in qrels order (trec_eval's definitions)."""
    per: dict[str, list[float]] = defaultdict(list)
    for qid, judged in qrels.items():
        if not judged or qid not in ranked:
            continue
        docs = ranked[qid]
        rels = [judged.get(d, 0) for d in docs]
        hits = [r > 0 for r in rels]
        n_rel = sum(1 for r in judged.values() if r > 0)
        ideal = sorted((r for r in judged.values() if r > 0), reverse=True)
        first_hit = next((i for i, h in enumerate(hits) if h), None)
        for k in k_values:
            dcg = sum(max(r, 0) / math.log2(i + 2) for i, r in enumerate(rels[:k]) if r > 0)
            idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal[:k]))
            per[f"ndcg_at_{k}"].append(dcg / idcg if idcg > 0 else 0.0)
            found, ap = 0, 0.0
            for i, h in enumerate(hits[:k]):
                if h:
                    found += 1
                    ap += found / (i + 1)
            per[f"map_at_{k}"].append(ap / n_rel if n_rel else 0.0)
            per[f"recall_at_{k}"].append(found / n_rel if n_rel else 0.0)
            per[f"precision_at_{k}"].append(found / k)
            per[f"mrr_at_{k}"].append(1.0 / (first_hit + 1) if first_hit is not None and first_hit < k else 0.0)
            per[f"hit_rate_at_{k}"].append(1.0 if first_hit is not None and first_hit < k else 0.0)
    return dict(per)


def sts_scores(emb1: np.ndarray, emb2: np.ndarray, gold: list[float]) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    gold = np.asarray(gold, dtype=np.float64)
    a, b = emb1.astype(np.float64), emb2.astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cosine = (a * b).sum(axis=1) / np.where(na * nb == 0, 1, na * nb)
    manhattan = -np.abs(a - b).sum(axis=1)
    euclidean = -np.linalg.norm(a - b, axis=1)
    out = {}
    for name, pred in (("cosine", cosine), ("manhattan", manhattan), ("euclidean", euclidean)):
        out[f"{name}_pearson"] = float(pearsonr(gold, pred)[0])
        out[f"{name}_spearman"] = float(spearmanr(gold, pred)[0])
    out["pearson"], out["spearman"] = out["cosine_pearson"], out["cosine_spearman"]
    return out


def undersample(labels: list[int], n_experiments: int, samples_per_label: int, seed: int) -> list[list[int]]:
    """Training indices of each experiment, exactly as MTEB draws them.

    MTEB 2.x (and 1.x, whose evaluators re-seeded numpy's global RNG with the seed before each
    draw) shuffles one index list in place with a fresh RandomState(seed) per experiment, then
    keeps the first `samples_per_label` examples of each label.
    """
    idxs = list(range(len(labels)))
    draws = []
    for _ in range(n_experiments):
        np.random.RandomState(seed).shuffle(idxs)
        counter: dict[int, int] = defaultdict(int)
        chosen = []
        for i in idxs:
            if counter[labels[i]] < samples_per_label:
                chosen.append(i)
                counter[labels[i]] += 1
        draws.append(chosen)
    return draws


def classification_scores(
    train_emb: Callable[[list[int]], np.ndarray],
    train_labels: list[int],
    test_emb: np.ndarray,
    test_labels: list[int],
    *,
    n_experiments: int = 10,
    samples_per_label: int = 8,
    max_iter: int = 100,
    seed: int = 42,
) -> dict:
    """Mean over experiments of a logistic regression's test scores; `train_emb(indices)` embeds train rows."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, precision_score, recall_score

    draws = undersample(train_labels, n_experiments, samples_per_label, seed)
    union = sorted(set().union(*draws))
    pos = {j: p for p, j in enumerate(union)}
    union_emb = train_emb(union)
    y_test = np.asarray(test_labels)
    binary = len(np.unique(y_test)) == 2
    per = []
    for chosen in draws:
        clf = LogisticRegression(max_iter=max_iter, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(union_emb[[pos[j] for j in chosen]], [train_labels[j] for j in chosen])
        y_pred = clf.predict(test_emb)
        scores = {
            "accuracy": accuracy_score(y_test, y_pred),
            "f1": f1_score(y_test, y_pred, average="macro"),
            "f1_weighted": f1_score(y_test, y_pred, average="weighted"),
            "precision": precision_score(y_test, y_pred, average="macro", zero_division=0),
            "precision_weighted": precision_score(y_test, y_pred, average="weighted", zero_division=0),
            "recall": recall_score(y_test, y_pred, average="macro", zero_division=0),
            "recall_weighted": recall_score(y_test, y_pred, average="weighted", zero_division=0),
        }
        if binary:
            scores["ap"] = average_precision_score(y_test, y_pred, average="macro")
            scores["ap_weighted"] = average_precision_score(y_test, y_pred, average="weighted")
        per.append({k: float(v) for k, v in scores.items()})
    avg = {k: float(np.mean([s[k] for s in per])) for k in per[0]}
    avg["scores_per_experiment"] = per
    return avg
