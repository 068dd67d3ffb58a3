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
        kind, target = default_backend(), DEFAULT
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


def default_backend() -> str:
    """The backend `default` runs the packaged Gemma 3 270M on: transformers in bfloat16 where the
    CPU multiplies bf16 in hardware (2.3x llama.cpp's generate throughput measured side by side on
    such a CPU, benchmarks/RESULTS.md), llama.cpp's Q4 kernels everywhere else. GECKO_LLM_BACKEND
    (llamacpp | transformers) overrides the choice."""
    chosen = os.environ.get("GECKO_LLM_BACKEND")
    if chosen:
        if chosen not in ("llamacpp", "transformers"):
            raise ValueError(f"GECKO_LLM_BACKEND must be llamacpp or transformers, not {chosen!r}")
        return chosen
    import torch

    if torch.cuda.is_available():
        return "transformers"
    from gecko.llm.hf import fast_bf16_cpu

    return "transformers" if fast_bf16_cpu() else "llamacpp"


def load_llm(spec: str = DEFAULT, cache: str | Path | None = None, use_cache: bool = True, **options) -> LLM:
    """The backend named by `spec`, wrapped in the content-addressed call cache (default on)."""
    backend = open_backend(spec, **options)
    if not use_cache:
        return backend
    return CachedLLM(backend, LLMCache(cache or default_cache_path()))


def default_cache_path() -> Path:
    """One cache per machine by default; GECKO_LLM_CACHE points a run at its own file."""
    return Path(os.environ.get("GECKO_LLM_CACHE", gecko_home() / "llm-cache.sqlite"))
