"""Does a change keep the demo's outputs? `gecko demo` at a base commit and at the working tree,
from the same caches, file by file.

The base commit runs first in a git worktree with a new GECKO_HOME (it fills the LLM, engine and
embedding caches); the working tree then runs with the same GECKO_HOME, so every LLM answer it
asks for again comes from the cache. Then every file both runs wrote is compared: JSON and JSONL
with their timing fields (`*wall*`, `*seconds*`, `*time*`, `*_at`, `date`, `created`, paths of the
run folder) left out; other files byte for byte (plots, whose metadata carry dates, are skipped).
A refactor that keeps behaviour prints no difference; the LLM calls each run made are printed too
(the second should make none).

    .venv/bin/python benchmarks/same_outputs.py BASE_COMMIT [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("wall", "seconds", "time", "date", "created", "elapsed", "per_s", "_at")
SKIPPED = {".png", ".lock"}


def _clean(value, run_dir: str):
    if isinstance(value, dict):
        return {k: _clean(v, run_dir) for k, v in value.items() if not any(word in k.lower() for word in VOLATILE)}
    if isinstance(value, list):
        return [_clean(v, run_dir) for v in value]
    if isinstance(value, str):
        return value.replace(run_dir, "RUN")
    return value


def _content(path: Path, run_dir: Path):
    if path.suffix == ".json":
        return _clean(json.loads(path.read_text()), str(run_dir))
    if path.suffix == ".jsonl" or path.name.endswith(".journal"):
        return [_clean(json.loads(line), str(run_dir)) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix in (".md", ".yaml", ".txt"):
        return path.read_text().replace(str(run_dir), "RUN")
    return path.read_bytes()


def run_demo(src: Path, home: Path, run_dir: Path) -> None:
    env = dict(os.environ, GECKO_HOME=str(home), PYTHONPATH=str(src / "src"))
    env.pop("GECKO_LLM_CACHE", None)
    done = subprocess.run([sys.executable, "-m", "gecko.cli", "demo", "--out", str(run_dir)], env=env, cwd=src,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"gecko demo in {src} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def llm_calls(run_dir: Path) -> dict:
    calls = {}
    for stage in ("generate", "relabel"):
        summary = json.loads((run_dir / stage / "manifest.json").read_text()).get("summary", {})
        calls[stage] = {k: summary.get(k) for k in ("llm_calls", "llm_cache_hits")}
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base", help="the commit to compare the working tree with")
    parser.add_argument("--keep", type=Path, default=None, help="folder for both runs (default: a temp dir)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="gecko-same-"))
    root.mkdir(parents=True, exist_ok=True)
    base_tree, home = root / "base-tree", root / "home"
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(base_tree), args.base], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        runs = {"base": root / "base", "new": root / "new"}
        run_demo(base_tree, home, runs["base"])
        run_demo(ROOT, home, runs["new"])
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, capture_output=True)
    files = {name: {p.relative_to(d) for p in d.rglob("*") if p.is_file() and p.suffix not in SKIPPED}
             for name, d in runs.items()}
    only = files["base"] ^ files["new"]
    different = sorted(str(rel) for rel in files["base"] & files["new"]
                       if _content(runs["base"] / rel, runs["base"]) != _content(runs["new"] / rel, runs["new"]))
    print(f"base {args.base} vs working tree; runs in {root}")
    print("LLM calls:", json.dumps({name: llm_calls(d) for name, d in runs.items()}))
    print(f"{len(files['base'] & files['new'])} files in both, {len(different)} different, {len(only)} in one run only")
    for rel in different:
        print(f"  different: {rel}")
    for rel in sorted(map(str, only)):
        print(f"  in one run only: {rel}")


if __name__ == "__main__":
    main()
