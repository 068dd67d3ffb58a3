"""The content-addressed LLM call cache: repeated calls do no LLM work, and kill -9 loses nothing stored."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

from gecko.llm import CachedLLM, GenerationParams, LLMCache

PROMPTS = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(12)]
PARAMS = GenerationParams(max_tokens=6)

WORKER = """
import sys
from gecko.llm import CachedLLM, GenerationParams, LLMCache
from gecko.llm.llamacpp import LlamaCppLLM
llm = CachedLLM(LlamaCppLLM(n_threads=1), LLMCache(sys.argv[1]))
prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(12)]
for prompt in prompts:  # one batch per prompt: each commits on its own
    llm.generate([prompt], GenerationParams(max_tokens=6))
"""


def _stored(path) -> int:
    with sqlite3.connect(path) as db:
        try:
            return db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
        except sqlite3.OperationalError:  # the worker has created the file but not yet the table
            return 0


def test_second_run_makes_zero_backend_calls(llamacpp, tmp_path):
    cache = LLMCache(tmp_path / "cache.sqlite")
    first = CachedLLM(llamacpp, cache)
    texts = first.generate(PROMPTS[:3], PARAMS)
    scores = first.score("Passage: cats purr.\nQuery:", [" do cats purr?", " dogs"])
    labels = first.label_logprobs("Is the sky blue? Answer:", [" Yes", " No"])
    assert first.backend_calls == 3 + 2 + 1

    again = CachedLLM(llamacpp, LLMCache(tmp_path / "cache.sqlite"))  # a new process would reopen the file
    assert again.generate(PROMPTS[:3], PARAMS) == texts
    assert [s.logprobs for s in again.score("Passage: cats purr.\nQuery:", [" do cats purr?", " dogs"])] == [
        s.logprobs for s in scores
    ]
    assert again.label_logprobs("Is the sky blue? Answer:", [" Yes", " No"]) == labels
    assert again.backend_calls == 0 and again.cache_hits == 6


def test_key_covers_parameters_and_backend(llamacpp, tmp_path):
    llm = CachedLLM(llamacpp, LLMCache(tmp_path / "cache.sqlite"))
    llm.generate(PROMPTS[:1], PARAMS)
    llm.generate(PROMPTS[:1], GenerationParams(max_tokens=7))
    llm.generate(PROMPTS[:1], GenerationParams(max_tokens=6, seed=1, temperature=0.5))
    assert llm.backend_calls == 3


def test_cache_survives_kill_9_mid_batch(tmp_path):
    path = tmp_path / "cache.sqlite"
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(path)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not path.exists() or _stored(path) < 3):
        time.sleep(0.05)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    stored = _stored(path)
    assert 3 <= stored < len(PROMPTS), "the worker should have died mid-run"
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    rerun = subprocess.run(
        [sys.executable, "-c", WORKER + "\nprint(llm.backend_calls, llm.cache_hits)", str(path)],
        capture_output=True, text=True, check=True,
    )
    calls, hits = map(int, rerun.stdout.split())
    assert hits == stored and calls == len(PROMPTS) - stored
    assert _stored(path) == len(PROMPTS)


def test_cli_generate_and_score_print_json(tmp_path):
    env = {**os.environ, "GECKO_LLM_CACHE": str(tmp_path / "cli.sqlite"), "GECKO_LLM_THREADS": "1"}
    gen = subprocess.run(
        [sys.executable, "-m", "gecko.cli", "llm", "generate", "--prompt", "The capital of France is", "--max-tokens", "5"],
        capture_output=True, text=True, env=env, check=True,
    )
    assert json.loads(gen.stdout)["text"].strip()
    score = subprocess.run(
        [sys.executable, "-m", "gecko.cli", "llm", "score", "--prefix", "The capital of France is", "--continuation", " Paris"],
        capture_output=True, text=True, env=env, check=True,
    )
    out = json.loads(score.stdout)
    assert out["tokens"] == [" Paris"] and len(out["logprobs"]) == 1 and out["total"] == out["logprobs"][0] < 0
