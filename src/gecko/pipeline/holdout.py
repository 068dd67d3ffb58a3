"""The label-free check: generated queries held out of training, scored before and after.

Users ask "did the fine-tune help?" and most have no labels. So a run keeps a small share of its
relabeled queries out of training (whole seed passages, so no held-out query's seed was trained
on through another query) and writes them as a BEIR folder: the run's corpus, the held-out
queries, and each one's relabeled positive as its one relevant document. `gecko eval` then scores
the base and the trained model on it like any retrieval task. Synthetic queries come from the
same LLM and prompts the model was trained on, so they overstate quality; the report says so.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from gecko.corpus import iter_passages, read_jsonl
from gecko.journal import write_jsonl_atomic, write_text_atomic
from gecko.pipeline.run import PipelineError

TASK_NAME = "holdout"


@dataclass(frozen=True)
class HoldoutSplit:
    train: Path  # the relabeled rows to train on
    folder: Path | None  # the BEIR folder of the held-out queries (None: none held out)
    held_out: int
    trained: int


def _draw(seed_id: str) -> float:
    """A fixed uniform draw in [0, 1) per seed passage: the split does not depend on order or run."""
    return int(hashlib.sha256(f"holdout:{seed_id}".encode()).hexdigest()[:12], 16) / 16**12


def split_holdout(relabeled: Path, corpus: str, out_dir: Path, share: float, max_queries: int) -> HoldoutSplit:
    """Write OUT_DIR/train.jsonl (rows to train on) and, when `share` > 0, OUT_DIR/holdout/ (BEIR:
    corpus.jsonl, queries.jsonl, qrels/test.tsv) with the queries of a `share` of the seed passages,
    at most `max_queries` of them (the seeds with the smallest draws)."""
    rows = [row for _, row in read_jsonl(relabeled, PipelineError)]
    by_seed: dict[str, list[dict]] = {}
    for row in rows:
        by_seed.setdefault(row["seed_id"], []).append(row)
    held, chosen = [], set()
    for seed in sorted((s for s in by_seed if _draw(s) < share), key=_draw):
        queries = by_seed[seed]
        if len(held) + len(queries) > max_queries:
            break
        held += queries
        chosen.add(seed)
    train = out_dir / "train.jsonl"
    write_jsonl_atomic(train, (row for row in rows if row["seed_id"] not in chosen))
    if not held:
        return HoldoutSplit(train, None, 0, len(rows))
    folder = out_dir / TASK_NAME
    write_jsonl_atomic(folder / "corpus.jsonl",
                       ({"_id": p.id, "title": p.title, "text": p.text} for p in iter_passages(corpus)))
    write_jsonl_atomic(folder / "queries.jsonl", ({"_id": row["id"], "text": row["query"]} for row in held))
    write_text_atomic(folder / "qrels" / "test.tsv",
                      "query-id\tcorpus-id\tscore\n" + "".join(f"{row['id']}\t{row['positive_id']}\t1\n" for row in held))
    write_text_atomic(folder / "holdout.json", json.dumps({"queries": len(held), "seed_passages": len(chosen),
                                                           "share": share, "max_queries": max_queries}))
    return HoldoutSplit(train, folder, len(held), len(rows) - len(held))
