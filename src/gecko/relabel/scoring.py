"""The LLM's two judgements of a (query, passage) pair: query likelihood (QL) and relevance (RC).

QL = log P(query | passage) under a few-shot prompt: the sum of the query tokens' teacher-forced
log-probabilities (`ql_norm="mean"`: per token; the query is the same for all candidates of one
example, so the ranking is the same either way and only the reported scale differs).
RC = log P(relevant label) - log P(other label), read from the label tokens' exact
full-vocabulary log-probabilities (`rc_score="yes"`: log P(relevant label) alone).

The joint prompt gives both from one pass over "block + passage + query + question" per
candidate (`gecko.llm.base.score_and_label`); candidates that share a passage are sent
together, so a backend that keeps KV state evaluates that passage once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from gecko.corpus import Passage
from gecko.llm.base import LLM, JointRequest, score_and_label
from gecko.prompts import PAIR_PROMPT_STYLES, PairPrompt, pair_prompt

QL_NORMS = ("sum", "mean")
RC_SCORES = ("logodds", "yes")


@dataclass(frozen=True)
class ScoreConfig:
    prompt_style: str = "joint"
    labels: tuple[str, str] = (" Yes", " No")
    question: str = "\nRelevant:"
    max_passage_words: int = 200
    ql_norm: str = "sum"
    rc_score: str = "logodds"

    def __post_init__(self):
        if self.prompt_style not in PAIR_PROMPT_STYLES:
            raise ValueError(f"unknown prompt style {self.prompt_style!r}; known: {', '.join(PAIR_PROMPT_STYLES)}")
        if self.ql_norm not in QL_NORMS:
            raise ValueError(f"unknown ql_norm {self.ql_norm!r}; known: {', '.join(QL_NORMS)}")
        if self.rc_score not in RC_SCORES:
            raise ValueError(f"unknown rc_score {self.rc_score!r}; known: {', '.join(RC_SCORES)}")
        if len(self.labels) != 2 or len(set(self.labels)) != 2:
            raise ValueError(f"labels must be two different strings (relevant, not relevant), got {self.labels!r}")
        if self.max_passage_words < 1:
            raise ValueError("max_passage_words must be at least 1")

    @property
    def prompt(self) -> PairPrompt:
        return pair_prompt(self.prompt_style, tuple(self.labels), self.question)

    def key(self) -> dict:
        """What the raw scores depend on (not the normalisations, applied afterwards)."""
        return {"prompt": self.prompt.id, "max_passage_words": self.max_passage_words}


@dataclass(frozen=True)
class PairScore:
    """Raw LLM log-probabilities for one pair; None where the prompt layout has no such signal."""

    ql_sum: float | None
    ql_tokens: int
    logp_relevant: float | None
    logp_other: float | None

    def ql(self, norm: str = "sum") -> float | None:
        if self.ql_sum is None:
            return None
        return self.ql_sum / max(self.ql_tokens, 1) if norm == "mean" else self.ql_sum

    def rc(self, kind: str = "logodds") -> float | None:
        if self.logp_relevant is None:
            return None
        return self.logp_relevant - self.logp_other if kind == "logodds" else self.logp_relevant

    def to_list(self) -> list:
        return [self.ql_sum, self.ql_tokens, self.logp_relevant, self.logp_other]

    @staticmethod
    def from_list(values: Sequence) -> "PairScore":
        return PairScore(*values)


def passage_for_llm(passage: Passage, max_words: int) -> str:
    """Title and text on one line, cut to the first `max_words` words (bounds the LLM's cost)."""
    text = f"{passage.title.strip()}. {passage.text}" if passage.title.strip() else passage.text
    return " ".join(text.split()[:max_words])


class PairScorer:
    """Scores the candidates of many queries, one passage (and every query that retrieved it) per LLM call."""

    def __init__(self, llm: LLM, config: ScoreConfig = ScoreConfig()):
        self.llm = llm
        self.config = config
        self.prompt = config.prompt
        self.pairs = 0

    def score_passage(self, passage: Passage, queries: Sequence[str]) -> list[PairScore]:
        """QL and RC of each query against one passage; a single cached LLM call."""
        text = passage_for_llm(passage, self.config.max_passage_words)
        prompt = self.prompt
        rendered = [prompt.render(text, q) for q in queries]
        self.pairs += len(queries)
        if prompt.ql and prompt.rc:
            requests = [JointRequest(c, q, question, prompt.labels) for c, q, question in rendered]
            out = []
            for s in score_and_label(self.llm, prompt.prefix, requests):
                rel, other = (s.labels.logprobs[label] for label in prompt.labels)
                out.append(PairScore(s.continuation.total, len(s.continuation.logprobs), rel, other))
            return out
        if prompt.ql:  # QL only: one score call per query (the prefix holds the passage)
            out = []
            for c, q, _ in rendered:
                (s,) = self.llm.score(prompt.prefix + c, [q])
                out.append(PairScore(s.total, len(s.logprobs), None, None))
            return out
        out = []
        for c, q, question in rendered:
            labels = self.llm.label_logprobs(prompt.prefix + c + q + question, list(prompt.labels)).logprobs
            out.append(PairScore(None, 0, labels[prompt.labels[0]], labels[prompt.labels[1]]))
        return out


def naive_score(llm: LLM, passage: Passage, query: str, config: ScoreConfig = ScoreConfig()) -> PairScore:
    """The naive way, for benchmarks: two separate full prompts per pair (QL, then RC), each
    evaluated from the start (the backend's KV state is reset before each when it can be)."""
    prompt = config.prompt
    context, cont, question = prompt.render(passage_for_llm(passage, config.max_passage_words), query)
    reset = getattr(llm, "reset", None)
    if callable(reset):
        reset()
    (s,) = llm.score(prompt.prefix + context, [cont])
    if callable(reset):
        reset()
    labels = llm.label_logprobs(prompt.prefix + context + cont + question, list(prompt.labels)).logprobs
    return PairScore(s.total, len(s.logprobs), labels[prompt.labels[0]], labels[prompt.labels[1]])
