"""LLM backends behind one protocol, chosen by a spec string.

Specs: `default` (packaged Gemma 3 270M on llama.cpp), `llamacpp:PATH.gguf|default`,
`openai:http://host:port/v1#model`, `transformers:DIR|FILE.gguf|default`.
"""

from __future__ import annotations

import os
from pathlib import Path

from gecko.llm.base import LLM, ContinuationScore, GenerationParams, LabelScores, LLMError
from gecko.llm.cache import CachedLLM, LLMCache
from gecko.models import DEFAULT, gecko_home

__all__ = [
    "LLM",
    "CachedLLM",
    "ContinuationScore",
    "GenerationParams",
    "LabelScores",
    "LLMCache",
    "LLMError",
    "load_llm",
    "open_backend",
]


def open_backend(spec: str = DEFAULT, **options) -> LLM:
    """The raw backend named by `spec`, without the cache."""
    kind, _, target = spec.partition(":")
    if spec == DEFAULT:
        kind, target = "llamacpp", DEFAULT
    if kind == "llamacpp":
        from gecko.llm.llamacpp import LlamaCppLLM

        return LlamaCppLLM(target or DEFAULT, **options)
    if kind == "openai":
        from gecko.llm.openai import OpenAILLM

        base_url, _, model = target.partition("#")
        return OpenAILLM(base_url, model or None, **options)
    if kind == "transformers":
        from gecko.llm.hf import TransformersLLM

        return TransformersLLM(target or DEFAULT, **options)
    raise ValueError(f"unknown LLM spec {spec!r}: expected default, llamacpp:PATH, openai:URL#MODEL or transformers:DIR")


def load_llm(spec: str = DEFAULT, cache: str | Path | None = None, use_cache: bool = True, **options) -> LLM:
    """The backend named by `spec`, wrapped in the content-addressed call cache (default on)."""
    backend = open_backend(spec, **options)
    if not use_cache:
        return backend
    return CachedLLM(backend, LLMCache(cache or default_cache_path()))


def default_cache_path() -> Path:
    """One cache per machine by default; GECKO_LLM_CACHE points a run at its own file."""
    return Path(os.environ.get("GECKO_LLM_CACHE", gecko_home() / "llm-cache.sqlite"))
