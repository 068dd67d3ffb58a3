"""`gecko demo`: the most complete pipeline that exists, on the bundled sample and the packaged models.

Today: validate the bundled corpus, then FRet step 1 (the LLM writes a task and a query per
passage). It grows with each stage until it runs the whole recipe.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

from gecko.corpus import check_corpus
from gecko.generate import GenerateConfig, run_generate
from gecko.llm import load_llm
from gecko.models import DEFAULT


def sample_corpus() -> Path:
    return Path(str(files("gecko").joinpath("data/sample/scifact-sample.jsonl")))


def run_demo(out_dir: str | Path = "runs/demo", passages: int = 10, llm_spec: str = DEFAULT) -> Path:
    out_dir = Path(out_dir)
    corpus = sample_corpus()
    print(check_corpus(corpus).render() + "\n")
    generated = out_dir / "generated.jsonl"
    summary = run_generate(corpus, generated, load_llm(llm_spec), GenerateConfig(), limit=passages)
    print("\n" + summary.render() + "\n")
    for line in generated.read_text().splitlines()[:6]:
        record = json.loads(line)
        print(f"{record['seed_id']:>9}  [{record['task_type']}] {record['query']}")
    print(f"\nwritten: {generated}")
    return generated
