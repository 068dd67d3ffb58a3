"""Ranking candidates from their scores, fusing rankings, and picking positive and negatives.

Pure functions on plain lists, so they are tested with hand-made scores.
"""

from __future__ import annotations

import random
from typing import Mapping, Sequence

FUSIONS = ("rrf", "ql", "rc", "weighted")
NEGATIVE_METHODS = ("last", "random")
SIGNALS = ("ql", "rc", "retriever")


def ranks(scores: Sequence[float], tiebreak: Sequence[int] | None = None) -> list[int]:
    """1-based rank of each item by score, higher first; ties broken by `tiebreak` (lower first),
    else by position, so every item gets a distinct rank."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], tiebreak[i] if tiebreak is not None else i, i))
    out = [0] * len(scores)
    for rank, i in enumerate(order, 1):
        out[i] = rank
    return out


def spearman(a: Sequence[int], b: Sequence[int]) -> float:
    """Spearman correlation of two rankings of the same items (distinct 1-based ranks)."""
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(a, b)) / (n * (n * n - 1)) if n > 1 else 0.0


def parse_weights(text: str | Mapping[str, float] | None) -> dict[str, float]:
    """`ql=1,rc=0.5,retriever=1` -> {"ql": 1.0, "rc": 0.5, "retriever": 1.0}."""
    if text is None:
        return {"ql": 1.0, "rc": 1.0}
    if isinstance(text, Mapping):
        items = dict(text)
    else:
        items = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            try:
                items[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"weights {text!r}: expected name=number pairs, e.g. ql=1,rc=0.5,retriever=1") from None
            if not sep:
                raise ValueError(f"weights {text!r}: expected name=number pairs, e.g. ql=1,rc=0.5,retriever=1")
    unknown = set(items) - set(SIGNALS)
    if unknown:
        raise ValueError(f"unknown signal(s) {sorted(unknown)} in weights; known: {', '.join(SIGNALS)}")
    if not any(v > 0 for v in items.values()):
        raise ValueError("weights: at least one signal needs a positive weight")
    return {k: float(v) for k, v in items.items()}


def fuse(
    signal_ranks: Mapping[str, Sequence[int]],
    method: str = "rrf",
    weights: Mapping[str, float] | None = None,
) -> list[float]:
    """Fused score per candidate (higher is better) from 1-based ranks per signal.

    rrf: 1/rank_QL + 1/rank_RC, no k constant (the paper's R); ql / rc: one signal alone
    (-rank); weighted: sum of weight/rank over the weighted signals (retriever included if
    weighted), i.e. weighted RRF.
    """
    if method == "rrf":
        weights = {"ql": 1.0, "rc": 1.0}
    elif method in ("ql", "rc"):
        return [-float(r) for r in signal_ranks[method]]
    elif method == "weighted":
        weights = parse_weights(weights)
    else:
        raise ValueError(f"unknown fusion {method!r}; known: {', '.join(FUSIONS)}")
    n = len(next(iter(signal_ranks.values())))
    out = [0.0] * n
    for name, weight in weights.items():
        if weight:
            for i, r in enumerate(signal_ranks[name]):
                out[i] += weight / r
    return out


def select_negatives(
    order: Sequence[int],
    method: str = "last",
    count: int = 1,
    rng: random.Random | None = None,
    exclude: set[int] = frozenset(),
) -> list[int]:
    """Candidate indices to use as hard negatives, given `order` (best first; order[0] is the positive).

    last: the lowest-ranked ones (rank N, N-1, ...); random: `count` drawn from ranks 2..N.
    Never the positive, never an index in `exclude` (e.g. the seed passage or a duplicate of the
    positive's text); fewer than `count` when too few candidates remain.
    """
    if method not in NEGATIVE_METHODS:
        raise ValueError(f"unknown negative method {method!r}; known: {', '.join(NEGATIVE_METHODS)}")
    if count < 1:
        raise ValueError("count must be at least 1")
    pool = [i for i in order[1:] if i not in exclude and i != order[0]]
    if method == "last":
        return pool[::-1][:count]
    rng = rng or random.Random(0)
    return rng.sample(pool, min(count, len(pool)))
