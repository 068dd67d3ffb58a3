"""The one protocol every LLM backend implements; the pipeline only ever sees this."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence, runtime_checkable


def free_cores() -> int:
    """Cores not busy right now: llama.cpp with more threads than free cores runs ~50x slower."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0
    return max(1, cores - busy)


def llm_threads(threads: int | None = None) -> int:
    """The threads a local LLM runs on: as asked, else GECKO_LLM_THREADS, else the free cores."""
    return threads or int(os.environ.get("GECKO_LLM_THREADS", 0)) or free_cores()


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings; part of the cache key, so two calls differ iff these differ."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0

    def key(self) -> dict:
        return {**asdict(self), "stop": list(self.stop)}


@dataclass(frozen=True)
class ContinuationScore:
    """Teacher-forced log-probabilities of each continuation token given the prefix."""

    tokens: list[str]
    logprobs: list[float]

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))

    @property
    def mean(self) -> float:
        return self.total / max(len(self.logprobs), 1)

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "logprobs": self.logprobs, "total": self.total}


@dataclass(frozen=True)
class LabelScores:
    """Exact log P(label | prompt) over the full vocabulary, per label string.

    A backend that only sees a top-k list (chat APIs' `top_logprobs`) leaves out the labels the
    list lacks and sets `floor`, the lowest listed log-probability: each absent label is below it.
    """

    logprobs: dict[str, float] = field(default_factory=dict)
    floor: float | None = None

    def to_dict(self) -> dict:
        """The cache's form: the plain label dict when exact (as stored before `floor` existed)."""
        return dict(self.logprobs) if self.floor is None else {"logprobs": dict(self.logprobs), "floor": self.floor}

    @staticmethod
    def from_dict(value: dict) -> "LabelScores":
        if "floor" in value and isinstance(value.get("logprobs"), dict):
            return LabelScores(dict(value["logprobs"]), value["floor"])
        return LabelScores(dict(value))

    def normalized(self) -> dict[str, float]:
        """Log-probabilities renormalised over the label set only (restricted vocabulary)."""
        top = max(self.logprobs.values())
        log_z = top + math.log(sum(math.exp(v - top) for v in self.logprobs.values()))
        return {k: v - log_z for k, v in self.logprobs.items()}


class LLMError(RuntimeError):
    """A backend failed in a way retrying will not fix (after bounded retries)."""


@runtime_checkable
class LLM(Protocol):
    """What the pipeline needs from a language model.

    `identity` names backend and model weights exactly (file hash or served model name):
    the cache keys on it, so two backends never share answers by accident.
    """

    identity: str

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[str]: ...

    def score(self, prefix: str, continuations: Sequence[str]) -> list[ContinuationScore]: ...

    def label_logprobs(self, prompt: str, labels: Sequence[str]) -> LabelScores: ...


def label_logprobs_by_scoring(llm: LLM, prompt: str, labels: Sequence[str]) -> LabelScores:
    """Exact label log-probabilities as teacher-forced scores of each label after the prompt.

    Works for multi-token labels and on any backend that can score; never reads a top-k list.
    """
    scores = llm.score(prompt, list(labels))
    return LabelScores({label: s.total for label, s in zip(labels, scores)})


# --- joint query-likelihood + relevance-label scoring (optional protocol method) --------------


@dataclass(frozen=True)
class JointRequest:
    """One candidate for `score_and_label`: the text after a shared prefix, in reading order.

    The backend sees `prefix + context + continuation + question` and returns the
    teacher-forced log-probabilities of `continuation` (given `prefix + context`) and the
    exact log P(label | everything before it) of each label. `context` is the passage part
    ("Passage: ...\\nQuery:"), `continuation` the query (" does X cause Y?"), `question` the
    relevance question ("\\nRelevant:"), `labels` its answers (" Yes", " No").
    """

    context: str
    continuation: str
    question: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class JointScore:
    continuation: ContinuationScore
    labels: LabelScores

    def to_dict(self) -> dict:
        return {"continuation": self.continuation.to_dict(), "labels": self.labels.to_dict()}

    @staticmethod
    def from_dict(value: dict) -> "JointScore":
        cont = value["continuation"]
        return JointScore(ContinuationScore(cont["tokens"], cont["logprobs"]), LabelScores.from_dict(value["labels"]))


def score_and_label_by_parts(llm: LLM, prefix: str, requests: Sequence[JointRequest]) -> list[JointScore]:
    """The generic fallback: `score` for the continuation, then `label_logprobs` for the labels.

    On a backend that reuses the KV cache of a shared prefix (llama.cpp), the second call
    re-evaluates only the tail past the last 64-token boundary plus the question.
    """
    out = []
    for r in requests:
        (cont,) = llm.score(prefix + r.context, [r.continuation])
        labels = llm.label_logprobs(prefix + r.context + r.continuation + r.question, list(r.labels))
        out.append(JointScore(cont, labels))
    return out


def label_logprobs_many(llm: LLM, prompts: Sequence[str], labels: Sequence[str]) -> list[LabelScores]:
    """`label_logprobs` of many prompts in one call where the backend has it (one Batch API job)."""
    method = getattr(llm, "label_logprobs_many", None)
    if callable(method):
        return method(list(prompts), list(labels))
    return [llm.label_logprobs(p, labels) for p in prompts]


def score_and_label(llm: LLM, prefix: str, requests: Sequence[JointRequest]) -> list[JointScore]:
    """QL + RC for each request: the backend's single-pass method if it has one, else by parts.

    `score_and_label` is an optional protocol method: a backend that can do it in one forward pass
    per candidate (logits at the continuation positions and at the last position) implements it;
    every other backend gets `score_and_label_by_parts`, which is exact too (same numbers, more
    tokens evaluated). Requests sharing a `context` should be passed next to each other: a backend
    that keeps KV state then evaluates that context once.
    """
    method = getattr(llm, "score_and_label", None)
    if callable(method):
        return method(prefix, list(requests))
    return score_and_label_by_parts(llm, prefix, requests)
