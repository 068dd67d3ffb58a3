"""The principal-axes rotation (gecko.train.axes) applied to models already trained, or to the base.

`gecko train` rotates its model at the end of every run (since 2026-12-06); this rotates finished
model folders the same way (fitted on the same seeded sample of SciFact's corpus as `gecko train
--corpus` takes), saves each as OUT/NAME-axes, and prints quality.py's table for each model and
its rotation, the rotation paired against the unrotated model:

    .venv/bin/python benchmarks/axes.py default runs/levers/kl-256/model [--split train|test] [--sts stsb,...]

`default` is the base model (all-MiniLM-L6-v2); the base as MTEB scores it is the table's first row.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from levers import CORPUS, ROOT
from quality import DIMS


def rotated(model: str, out: Path, sample: int, seed: int) -> Path:
    from sentence_transformers import SentenceTransformer

    from gecko.corpus import load_corpus
    from gecko.models import resolve_embedder
    from gecko.train.axes import corpus_documents, rotate_onto_principal_axes

    if (out / "config.json").exists():
        return out
    st = SentenceTransformer(resolve_embedder(model), device="cpu")
    summary = rotate_onto_principal_axes(st, corpus_documents(load_corpus(str(CORPUS))[0], sample, seed), list(DIMS))
    st.save(str(out))
    print(f"{out}: {summary}", flush=True)
    return out


def main() -> None:
    from gecko.train import TrainConfig

    defaults = TrainConfig(data=["-"], out="-")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="model folders, or default (the base model)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "axes")
    parser.add_argument("--split", choices=["test", "train"], default="train", help="train: SciFact's 809 dev queries")
    parser.add_argument("--sts", default="stsb")
    args = parser.parse_args()
    code = 0
    for model in args.models:
        name = "base" if model == "default" else Path(model).parent.name if Path(model).name == "model" else Path(model).name
        axes = rotated(model, args.out / f"{name}-axes", defaults.axes_documents, defaults.seed)
        command = [sys.executable, str(Path(__file__).with_name("quality.py")), model, str(axes), "--names", f"{name},{name}-axes",
                   "--versus", name, "--split", args.split, "--sts", args.sts]
        code = code or subprocess.run(command).returncode
    sys.exit(code)


if __name__ == "__main__":
    main()
