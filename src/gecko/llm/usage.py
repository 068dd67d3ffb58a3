"""What LLM calls cost: prices per model, the running total of a process, and the budget that stops it.

Prices are the user's (a table in the config, by model name): gecko ships none, because they
change. The cost is an estimate from the token counts the server reports (`usage` of each
response), live calls at the listed price and Batch API calls at `batch` times it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gecko.llm.base import LLMError


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens; `batch` is the share of it a Batch API call costs (OpenAI: half)."""

    input: float
    output: float
    batch: float = 0.5

    def __post_init__(self):
        if min(self.input, self.output) < 0 or not 0 <= self.batch <= 1:
            raise ValueError(f"a price needs input, output >= 0 ($ per million tokens) and batch in [0, 1], got {self}")

    def cost(self, tokens_in: int, tokens_out: int, batch_in: int = 0, batch_out: int = 0) -> float:
        live = tokens_in * self.input + tokens_out * self.output
        return (live + self.batch * (batch_in * self.input + batch_out * self.output)) / 1e6


COUNTERS = ("backend_calls", "cache_hits", "evaluated_tokens", "tokens_in", "tokens_out", "batch_tokens_in", "batch_tokens_out", "cost")


@dataclass(frozen=True)
class Usage:
    """What an LLM did during one stage: live and Batch API tokens together; None where the
    backend keeps no such counter."""

    calls: int
    cache_hits: int
    tokens_in: int
    tokens_out: int
    evaluated_tokens: int | None
    cost: float | None


class UsageMeter:
    """The LLM's counters at the start of a stage, so that `used` gives that stage's share."""

    def __init__(self, llm):
        self.llm = llm
        self.before = {name: getattr(llm, name, None) for name in COUNTERS}

    def used(self) -> Usage:
        d = {name: None if start is None else getattr(self.llm, name, 0) - start for name, start in self.before.items()}
        return Usage(calls=d["backend_calls"] or 0, cache_hits=d["cache_hits"] or 0,
                     tokens_in=(d["tokens_in"] or 0) + (d["batch_tokens_in"] or 0),
                     tokens_out=(d["tokens_out"] or 0) + (d["batch_tokens_out"] or 0),
                     evaluated_tokens=d["evaluated_tokens"], cost=None if d["cost"] is None else round(d["cost"], 6))


class BudgetExceeded(LLMError):
    """The estimated cost reached `max_cost`: the stage stops before its next uncached call."""


def price_for(prices: dict[str, Price], llm) -> Price | None:
    """The price of `llm` in the table: by the served model's name, else by its identity."""
    for name in (getattr(llm, "model", None), getattr(llm, "identity", None)):
        if name is not None and name in prices:
            return prices[name]
    return None


def check_budget(max_cost: float | None, price: Price | None, llm) -> None:
    """A budget without a price could never stop anything: refuse it at the start."""
    if max_cost is not None and price is None:
        name = getattr(llm, "model", None) or getattr(llm, "identity", "?")
        raise LLMError(f"max_cost {max_cost} needs a price for the model {name!r}: add prices: {{{name}: {{input: USD_PER_1M, output: USD_PER_1M}}}}")


def usage_line(summary) -> str:
    """Calls, tokens and estimated cost of a stage, for the printed summaries."""
    cost = "no price for this LLM" if summary.cost is None else f"estimated ${summary.cost:.4f}"
    return (f"LLM usage: {summary.llm_calls} calls (+{summary.llm_cache_hits} from cache), "
            f"{summary.tokens_in} prompt tokens, {summary.tokens_out} generated; {cost}")
