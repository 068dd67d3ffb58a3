"""Content-addressed cache of every LLM call, so a rerun after a crash repeats no LLM work.

SQLite in WAL mode: a commit is atomic and durable, so kill -9 mid-batch loses at most the
uncommitted answers, never corrupts what was stored. Each batch commits as soon as the
backend returns it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Callable, Sequence

from gecko.llm.base import (
    LLM,
    ContinuationScore,
    GenerationParams,
    JointRequest,
    JointScore,
    LabelScores,
    label_logprobs_many,
    score_and_label,
)
from gecko.llm.usage import BudgetExceeded, Price, check_budget


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class LLMCache:
    """A key → JSON value store on SQLite (WAL); safe for several processes sharing one file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # each commit fsynced: durable, as the docstring says
        self._db.execute("CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def get_many(self, keys: Sequence[str]) -> dict[str, object]:
        found: dict[str, object] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ",".join("?" * len(chunk))
                for key, value in self._db.execute(f"SELECT key, value FROM calls WHERE key IN ({marks})", chunk):
                    found[key] = json.loads(value)
        return found

    def put_many(self, items: dict[str, object]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO calls (key, value) VALUES (?, ?)",
                    [(k, json.dumps(v, ensure_ascii=False)) for k, v in items.items()],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CachedLLM:
    """Wraps any backend; answers repeated calls from the cache, counts real backend calls, and
    keeps the estimated cost of what the backend computed (`price`), stopping with
    `BudgetExceeded` before the next uncached call once it reaches `max_cost`."""

    def __init__(self, backend: LLM, cache: LLMCache, price: Price | None = None, max_cost: float | None = None):
        check_budget(max_cost, price, backend)
        self.backend = backend
        self.cache = cache
        self.identity = backend.identity
        self.price = price
        self.max_cost = max_cost
        self.backend_calls = 0  # number of items the backend actually computed
        self.cache_hits = 0
        self.cost = 0.0 if price is not None else None  # estimated US dollars, None without a price

    def _through_cache(self, keys: list[str], compute: Callable[[list[int]], list[object]]) -> list[object]:
        found = self.cache.get_many(keys)
        missing = [i for i, k in enumerate(keys) if k not in found]
        self.cache_hits += len(keys) - len(missing)
        if missing:
            if self.max_cost is not None and self.cost >= self.max_cost:
                raise BudgetExceeded(f"the budget is spent: estimated ${self.cost:.4f} of max_cost ${self.max_cost:g} "
                                     f"after {self.backend_calls} LLM calls")
            before = self._tokens()
            values = compute(missing)
            if self.price is not None:
                self.cost += self.price.cost(*(b - a for a, b in zip(before, self._tokens())))
            self.backend_calls += len(missing)
            fresh = {keys[i]: v for i, v in zip(missing, values)}
            self.cache.put_many(fresh)
            found.update(fresh)
        return [found[k] for k in keys]

    def _tokens(self) -> tuple[int, int, int, int]:
        b = self.backend
        return tuple(getattr(b, name, 0) or 0 for name in ("tokens_in", "tokens_out", "batch_tokens_in", "batch_tokens_out"))

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[str]:
        prompts = list(prompts)
        keys = [_key("generate", self.identity, p, params.key()) for p in prompts]
        return self._through_cache(keys, lambda idx: self.backend.generate([prompts[i] for i in idx], params))

    def score(self, prefix: str, continuations: Sequence[str]) -> list[ContinuationScore]:
        conts = list(continuations)
        keys = [_key("score", self.identity, prefix, c) for c in conts]

        def compute(idx: list[int]) -> list[object]:
            return [s.to_dict() for s in self.backend.score(prefix, [conts[i] for i in idx])]

        return [ContinuationScore(v["tokens"], v["logprobs"]) for v in self._through_cache(keys, compute)]

    def label_logprobs(self, prompt: str, labels: Sequence[str]) -> LabelScores:
        (scores,) = self.label_logprobs_many([prompt], labels)
        return scores

    def label_logprobs_many(self, prompts: Sequence[str], labels: Sequence[str]) -> list[LabelScores]:
        """One cache entry per prompt (the same as `label_logprobs`'); misses in one backend call."""
        prompts, labels = list(prompts), list(labels)
        keys = [_key("labels", self.identity, p, labels) for p in prompts]

        def compute(idx: list[int]) -> list[object]:
            return [s.to_dict() for s in label_logprobs_many(self.backend, [prompts[i] for i in idx], labels)]

        return [LabelScores.from_dict(v) for v in self._through_cache(keys, compute)]

    def score_and_label(self, prefix: str, requests: Sequence[JointRequest]) -> list[JointScore]:
        """QL + RC per request, one cache entry each; misses go to the backend's single-pass
        method when it has one, else to the exact by-parts fallback on the backend."""
        reqs = list(requests)
        keys = [_key("score_and_label", self.identity, prefix, r.context, r.continuation, r.question, list(r.labels)) for r in reqs]

        def compute(idx: list[int]) -> list[object]:
            return [s.to_dict() for s in score_and_label(self.backend, prefix, [reqs[i] for i in idx])]

        return [JointScore.from_dict(v) for v in self._through_cache(keys, compute)]

    def __getattr__(self, name: str):
        return getattr(self.backend, name)
