"""SciFact's labelled train claims written as `gecko generate` records, for `gecko relabel`.

A human writer in the LLM's place: each of the 809 claims becomes one generated query of the
fact-checking task (the first of its catalogue's descriptions, which the LLM's queries carry too), seeded
by the first abstract its qrels cite. Relabeled by the packaged LLM, they train like the LLM's own
queries (`benchmarks/levers.py claims-w4`), so the two writers compare at one teacher:

    .venv/bin/python benchmarks/claims_as_queries.py > claims.jsonl
"""

from __future__ import annotations

import csv
import gzip
import json

from quality import DATA

from gecko.prompts import TASK_TYPES


def main() -> None:
    folder = DATA / "scifact"
    with gzip.open(folder / "queries.jsonl.gz", "rt", encoding="utf-8") as lines:
        claims = {row["_id"]: row["text"] for row in map(json.loads, lines)}
    seeds: dict[str, str] = {}
    with open(folder / "qrels.train.tsv", encoding="utf-8") as qrels:
        for row in csv.DictReader(qrels, delimiter="\t"):
            seeds.setdefault(row["query-id"], row["corpus-id"])
    task = TASK_TYPES["fact_checking"].descriptions[0]
    for claim, seed in seeds.items():
        print(json.dumps({"id": f"claim{claim}", "seed_id": seed, "task_type": "fact_checking", "task": task,
                          "query": claims[claim]}))


if __name__ == "__main__":
    main()
