"""SciFact's labelled train claims written as `gecko generate` records, for `gecko relabel`.

A human writer in the LLM's place: each of the 809 claims becomes one generated query of the
fact-checking task (the first of its catalogue's descriptions, which the LLM's queries carry too), seeded
by the first abstract its qrels cite. Relabeled by the packaged LLM, they train like the LLM's own
queries (`benchmarks/levers.py claims-w4`), so the two writers compare at one teacher:

    .venv/bin/python benchmarks/claims_as_queries.py > claims.jsonl
"""

from __future__ import annotations

import json

from quality import DATA

from gecko.corpus import load_beir
from gecko.prompts import TASK_TYPES


def main() -> None:
    claims = load_beir(DATA / "scifact", "train")
    task = TASK_TYPES["fact_checking"].descriptions[0]
    for claim, cited in claims.qrels.items():
        print(json.dumps({"id": f"claim{claim}", "seed_id": next(iter(cited)), "task_type": "fact_checking",
                          "task": task, "query": claims.queries[claim]}))


if __name__ == "__main__":
    main()
