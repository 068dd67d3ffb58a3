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

import math
from dataclasses import dataclass
from typing import Sequence

from gecko.corpus import Passage
from gecko.llm.base import LLM, JointRequest, LabelScores, LLMError, label_logprobs_many, score_and_label
from gecko.options import option
from gecko.prompts import PAIR_PROMPT_STYLES, PairPrompt, pair_prompt

QL_NORMS = ("sum", "mean")
RC_SCORES = ("logodds", "yes")
# PairScore fields that must be finite where present (NaN and ±inf are no log-probability, nor JSON)
FINITE_FIELDS = {"ql_sum": "QL", "logp_relevant": "log P(relevant label)", "logp_other": "log P(other label)",
                 "label_floor": "the label floor"}


def labels_option(text: str) -> tuple[str, str]:
    """`--labels Yes/No`: the RC labels, each after a space as the LLM writes it."""
    relevant, sep, other = text.partition("/")
    if not sep or not relevant.strip() or not other.strip():
        raise ValueError(text)  # argparse names the option, the value and the form wanted
    return " " + relevant.strip(), " " + other.strip()


labels_option.__name__ = "RELEVANT/OTHER (e.g. Yes/No)"


class InvalidScore(LLMError):
    """The LLM backend answered a scoring call with something that is not a score: a missing
    label, too few or too many scores, or a value that is not finite."""


@dataclass(frozen=True)
class ScoreConfig:
    prompt_style: str = option("joint", "joint: QL and RC from one pass per candidate; ql: QL only; rc-query-first: RC only",
                               choices=PAIR_PROMPT_STYLES)
    labels: tuple[str, str] = option((" Yes", " No"), "RC labels RELEVANT/OTHER (one word each)", type=labels_option)
    question: str = option("\nRelevant:", cli=False)
    max_passage_words: int = option(200, "passages are cut to this many words in LLM prompts")
    ql_norm: str = option("sum", "QL: sum of query token log-probs, or per token", choices=QL_NORMS)
    rc_score: str = option("logodds", "RC: log P(relevant) - log P(other), or log P(relevant) alone", choices=RC_SCORES)

    def __post_init__(self):
        for what, value, known in (("prompt style", self.prompt_style, PAIR_PROMPT_STYLES), ("ql_norm", self.ql_norm, QL_NORMS),
                                   ("rc_score", self.rc_score, RC_SCORES)):
            if value not in known:
                raise ValueError(f"unknown {what} {value!r}; known: {', '.join(known)}")
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
    """Raw LLM log-probabilities for one pair; None where the prompt layout has no such signal.

    `label_floor` is set when the labels came from a top-k list (chat APIs): a label absent from
    it has logp None and lies below the floor; `rc` then uses the floor as that bound, so the
    log-odds are a lower bound (the other label absent) or an upper bound (the relevant one
    absent), and None when both are absent. `rc_bound` says which.
    """

    ql_sum: float | None
    ql_tokens: int
    logp_relevant: float | None
    logp_other: float | None
    label_floor: float | None = None

    def ql(self, norm: str = "sum") -> float | None:
        if self.ql_sum is None:
            return None
        return self.ql_sum / max(self.ql_tokens, 1) if norm == "mean" else self.ql_sum

    def rc(self, kind: str = "logodds") -> float | None:
        rel, other, floor = self.logp_relevant, self.logp_other, self.label_floor
        if floor is None:
            if rel is None:
                return None
            return rel - other if kind == "logodds" else rel
        if rel is None and (other is None or kind == "yes"):
            return None if kind == "logodds" else floor
        if kind == "yes":
            return rel
        return (rel if rel is not None else floor) - (other if other is not None else floor)

    def rc_bound(self) -> str | None:
        """"lower" / "upper" when `rc` is a bound (a label absent from a top-k list), "unknown" when
        both labels are absent (no RC), else None."""
        if self.label_floor is None:
            return None
        if self.logp_relevant is None and self.logp_other is None:
            return "unknown"
        return "lower" if self.logp_other is None else "upper" if self.logp_relevant is None else None

    def not_finite(self) -> str | None:
        """What is NaN or infinite here ("QL nan"), else None."""
        for name, what in FINITE_FIELDS.items():
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                return f"{what} {value}"
        return None

    def to_list(self) -> list:
        values = [self.ql_sum, self.ql_tokens, self.logp_relevant, self.logp_other]
        return values if self.label_floor is None else [*values, self.label_floor]

    @staticmethod
    def from_list(values: Sequence) -> "PairScore":
        return PairScore(*values)


def passage_for_llm(passage: Passage, max_words: int) -> str:
    """Title and text on one line, cut to the first `max_words` words (bounds the LLM's cost)."""
    text = f"{passage.title.strip()}. {passage.text}" if passage.title.strip() else passage.text
    return " ".join(text.split()[:max_words])


class PairScorer:
    """Scores the candidates of many queries, one passage (and every query that retrieved it) per LLM call.

    An LLM without query likelihood (a chat-only server: `ql_missing`) gets RC only, from the
    same prompt up to the relevance question."""

    def __init__(self, llm: LLM, config: ScoreConfig = ScoreConfig()):
        self.llm = llm
        self.config = config
        self.prompt = config.prompt
        self.pairs = 0
        self.ql_missing = getattr(llm, "ql_missing", None)
        rc_missing = getattr(llm, "rc_missing", None)
        if self.ql_missing and not self.prompt.rc or self.ql_missing and rc_missing:
            raise LLMError(f"{llm.identity}: relabel needs QL or RC and gets neither with prompt style "
                           f"{config.prompt_style!r}: QL {self.ql_missing}; RC {rc_missing or 'needs prompt style joint or rc-query-first'}")

    def score_passage(self, passage: Passage, queries: Sequence[str]) -> list[PairScore]:
        """QL and RC of each query against one passage; a single cached LLM call."""
        return self.score_passages([(passage, list(queries))])[0]

    def score_passages(self, groups: Sequence[tuple[Passage, Sequence[str]]]) -> list[list[PairScore]]:
        """Every group's pairs in one LLM call (a Batch API backend makes it one job)."""
        prompt = self.prompt
        rendered = [(c, q, question) for passage, queries in groups
                    for c, q, question in (prompt.render(passage_for_llm(passage, self.config.max_passage_words), q) for q in queries)]
        self.pairs += len(rendered)
        flat = []
        if prompt.ql and not self.ql_missing:
            if prompt.rc:
                requests = [JointRequest(c, q, question, prompt.labels) for c, q, question in rendered]
                for s in self._answers(score_and_label(self.llm, prompt.prefix, requests), len(rendered)):
                    rel, other = self._labels(s.labels)
                    flat.append(PairScore(s.continuation.total, len(s.continuation.logprobs), rel, other))
            else:  # QL only: one score call per query (the prefix holds the passage)
                for c, q, _ in rendered:
                    (s,) = self._answers(self.llm.score(prompt.prefix + c, [q]), 1)
                    flat.append(PairScore(s.total, len(s.logprobs), None, None))
        else:
            texts = [prompt.prefix + c + q + question for c, q, question in rendered]
            for labels in self._answers(label_logprobs_many(self.llm, texts, list(prompt.labels)), len(texts)):
                rel, other = self._labels(labels)
                flat.append(PairScore(None, 0, rel, other, labels.floor))
        out, start = [], 0
        for _, queries in groups:
            out.append(flat[start : start + len(queries)])
            start += len(queries)
        return out

    def _answers(self, answers: Sequence, expected: int) -> list:
        """The backend's answers, one per pair sent (a miscount would shift every later pair's scores)."""
        answers = list(answers)
        if len(answers) != expected:
            raise InvalidScore(f"{self.llm.identity}: {len(answers)} scores for {expected} (query, passage) pairs")
        return answers

    def _labels(self, labels: LabelScores) -> tuple[float | None, float | None]:
        """(relevant, other); a label may be absent only from a top-k list (one with a floor)."""
        wanted = self.prompt.labels
        missing = [label for label in wanted if label not in labels.logprobs]
        if missing and labels.floor is None:
            raise InvalidScore(f"{self.llm.identity}: no log-probability for label(s) {missing} "
                               f"(got {sorted(labels.logprobs)})")
        return labels.logprobs.get(wanted[0]), labels.logprobs.get(wanted[1])


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
