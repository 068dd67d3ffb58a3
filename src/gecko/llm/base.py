"""The one protocol every LLM backend implements; the pipeline only ever sees this."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings; part of the cache key, so two calls differ iff these differ."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0

    def key(self) -> dict:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": list(self.stop),
            "seed": self.seed,
        }


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
    """Exact log P(label | prompt) over the full vocabulary, per label string."""

    logprobs: dict[str, float] = field(default_factory=dict)

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
