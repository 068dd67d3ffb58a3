"""Build the bundled mini SciFact retrieval task (`src/gecko/data/sample/scifact-mini/`).

    python scripts/make_demo_data.py [--scifact ../shared/data/scifact]

50 test queries of BEIR SciFact (a seeded draw from the 300 judged ones) with every document
they are judged relevant to, the 40 passages of the bundled demo corpus
(`scifact-sample.jsonl`: the demo writes its training queries for these, so distillation is on
the same domain without touching any query or judgement), and seeded random distractors up to
300 documents. BEIR layout (corpus.jsonl, queries.jsonl, qrels/test.tsv), which
`gecko.corpus.load_beir` and `gecko eval` read. Deterministic: rerunning gives the same files.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
from pathlib import Path

PACKAGE_DATA = Path(__file__).resolve().parents[1] / "src" / "gecko" / "data" / "sample"
N_QUERIES = 50
N_DOCS = 300
SEED = 0


def _jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def build(scifact: Path, out: Path) -> dict:
    docs = _jsonl_gz(scifact / "corpus.jsonl.gz")
    queries = {q["_id"]: q for q in _jsonl_gz(scifact / "queries.jsonl.gz")}
    with (scifact / "qrels.test.tsv").open(encoding="utf-8", newline="") as handle:
        rows = [r for r in csv.reader(handle, delimiter="\t") if r and r[0] != "query-id"]
    judged = sorted({r[0] for r in rows}, key=int)
    rng = random.Random(SEED)
    chosen = sorted(rng.sample(judged, N_QUERIES), key=int)
    qrels = [r for r in rows if r[0] in chosen]
    sample = [json.loads(line)["_id"] for line in (PACKAGE_DATA / "scifact-sample.jsonl").read_text(encoding="utf-8").splitlines()]
    keep = set(r[1] for r in qrels) | set(sample)
    others = sorted(d["_id"] for d in docs if d["_id"] not in keep)
    keep |= set(rng.sample(others, N_DOCS - len(keep)))

    out.mkdir(parents=True, exist_ok=True)
    (out / "qrels").mkdir(exist_ok=True)
    corpus = [{"_id": d["_id"], "title": d["title"], "text": d["text"]} for d in docs if d["_id"] in keep]  # corpus order
    (out / "corpus.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in corpus), encoding="utf-8")
    (out / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": queries[q]["text"]}, ensure_ascii=False) + "\n" for q in chosen), encoding="utf-8"
    )
    (out / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels), encoding="utf-8"
    )
    return {"docs": len(corpus), "queries": len(chosen), "qrels": len(qrels), "sample_docs": len(sample),
            "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != "README.md")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scifact", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact",
                        help="BEIR SciFact folder (corpus.jsonl.gz, queries.jsonl.gz, qrels.test.tsv)")
    parser.add_argument("--out", type=Path, default=PACKAGE_DATA / "scifact-mini")
    args = parser.parse_args()
    print(json.dumps(build(args.scifact, args.out)))


if __name__ == "__main__":
    main()
