"""`gecko demo`: the most complete pipeline that exists, on the bundled sample and the packaged models.

Today that is corpus validation plus the LLM writing one search query per passage (the start
of FRet step 1); it grows with each stage until it runs the whole recipe.
"""

from __future__ import annotations

import time
from importlib.resources import files
from pathlib import Path

from gecko.corpus import load_corpus
from gecko.llm import GenerationParams, load_llm
from gecko.models import DEFAULT

# Few-shot *completion* prompt: the default Gemma 3 270M is a base model (no chat template).
FEW_SHOT = (
    "Passage: Aspirin irreversibly inhibits cyclooxygenase, which reduces the synthesis of prostaglandins "
    "that mediate pain and inflammation.\n"
    "Query: how does aspirin reduce inflammation\n\n"
    "Passage: The Treaty of Westphalia of 1648 ended the Thirty Years' War and established the principle of "
    "state sovereignty in Europe.\n"
    "Query: what ended the thirty years war\n\n"
)


def sample_corpus() -> Path:
    return Path(str(files("gecko").joinpath("data/sample/scifact-sample.jsonl")))


def run_demo(passages: int = 5, llm_spec: str = DEFAULT, max_words: int = 120) -> list[tuple[str, str]]:
    corpus, summary = load_corpus(sample_corpus())
    print(summary.render())
    llm = load_llm(llm_spec)
    params = GenerationParams(max_tokens=24, temperature=0.0, stop=("\n",))
    rows = []
    start = time.perf_counter()
    for passage in corpus[:passages]:
        text = " ".join(passage.text.split()[:max_words])
        (query,) = llm.generate([FEW_SHOT + f"Passage: {text}\nQuery:"], params)
        rows.append((passage.id, query.strip()))
        print(f"{passage.id:>10}  {passage.title[:60]!r}\n{'':>10}  -> {query.strip()!r}")
    print(f"\n{len(rows)} queries in {time.perf_counter() - start:.1f} s (LLM: {llm.identity[:40]}...)")
    return rows
