"""LLM backends behind one protocol, chosen by a spec string.

Specs (`LLMSpec`): `default` (packaged Gemma 3 270M on the engine this machine runs fastest),
`llamacpp:PATH.gguf|default`, `openai:http://host:port/v1#model` (`gecko.scale` takes several
comma-separated URLs), `transformers:DIR|FILE.gguf|default`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gecko.llm.base import LLM, ContinuationScore, GenerationParams, LabelScores, LLMError
from gecko.llm.cache import CachedLLM, LLMCache
from gecko.llm.usage import BudgetExceeded, Price, price_for
from gecko.models import DEFAULT, gecko_home

SPEC_KINDS = ("llamacpp", "openai", "transformers")
SPEC_HELP = "default, llamacpp:PATH.gguf|default, openai:URL#MODEL or transformers:DIR|FILE.gguf|default"

__all__ = [
    "LLM", "CachedLLM", "ContinuationScore", "GenerationParams", "LabelScores", "LLMCache", "LLMError", "LLMSpec",
    "BudgetExceeded", "Price", "load_llm", "open_backend"
]


def open_backend(spec: str = DEFAULT, **options) -> LLM:
    """The raw backend named by `spec`, without the cache. `default` runs on the engine this
    machine runs fastest (gecko.llm.engine), said once on stderr."""
    parsed = LLMSpec.parse(spec)
    kind = parsed.kind
    if kind == DEFAULT:
        from gecko.llm.engine import announce, choose_engine

        choice = choose_engine(options.get("n_threads"))
        announce(choice)
        kind = choice.backend
        if choice.dtype:
            options.setdefault("dtype", choice.dtype)
    if kind == "llamacpp":
        from gecko.llm.llamacpp import LlamaCppLLM

        return LlamaCppLLM(parsed.target or DEFAULT, **options)
    if kind == "openai":
        from gecko.llm.openai import OpenAILLM

        try:
            return OpenAILLM(parsed.target, parsed.model or None, **options)
        except (TypeError, ValueError) as err:  # an unknown or bad llm option
            raise LLMError(f"llm options for {spec}: {err}") from None
    from gecko.llm.hf import TransformersLLM

    return TransformersLLM(parsed.target or DEFAULT, **options)


@dataclass(frozen=True)
class LLMSpec:
    """A parsed `--llm` spec: `kind` (default, llamacpp, openai, transformers), `target` (a model
    path or `default`; openai's server URL, or URLs comma-separated) and `model` (openai's `#MODEL`)."""

    kind: str
    target: str = DEFAULT
    model: str = ""

    @classmethod
    def parse(cls, spec: str) -> "LLMSpec":
        """An unknown kind is an LLMError naming the accepted ones."""
        if spec == DEFAULT:
            return cls(DEFAULT)
        kind, _, target = spec.partition(":")
        if kind not in SPEC_KINDS:
            raise LLMError(f"unknown LLM spec {spec!r}: expected {SPEC_HELP}")
        target, _, model = target.partition("#") if kind == "openai" else (target, "", "")
        return cls(kind, target, model)

    @property
    def urls(self) -> list[str]:
        return [url.strip() for url in self.target.split(",") if url.strip()]


def load_llm(spec: str = DEFAULT, cache: str | Path | None = None, use_cache: bool = True, *,
             prices: dict[str, Price] | None = None, max_cost: float | None = None, **options) -> LLM:
    """The backend named by `spec`, wrapped in the content-addressed call cache (default on),
    which also keeps its estimated cost (`prices`: by model name) and stops at `max_cost`."""
    backend = open_backend(spec, **options)
    if not use_cache:
        return backend
    return CachedLLM(backend, LLMCache(cache or default_cache_path()), price_for(prices or {}, backend), max_cost)


def default_cache_path() -> Path:
    """One cache per machine by default; GECKO_LLM_CACHE points a run at its own file."""
    return Path(os.environ.get("GECKO_LLM_CACHE", gecko_home() / "llm-cache.sqlite"))
