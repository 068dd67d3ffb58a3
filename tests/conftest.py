"""Shared fixtures: the real packaged models, loaded once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def llamacpp():
    """The packaged Gemma 3 270M on one thread (tests may run beside another llama.cpp process)."""
    from gecko.llm.llamacpp import LlamaCppLLM

    return LlamaCppLLM(n_threads=1)
