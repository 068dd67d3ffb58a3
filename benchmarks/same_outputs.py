"""Does a change keep the demo's outputs? `gecko demo` at a base commit and at the working tree,
from the same caches, file by file.

The base commit runs first in a git worktree with a new GECKO_HOME (it fills the LLM, engine and
embedding caches); the working tree then runs with the same GECKO_HOME, so every LLM answer it
asks for again comes from the cache. Then every file both runs wrote is compared, with the run
folder's and source tree's paths masked: JSON and JSONL without their timing fields (`*wall*`,
`*seconds*`, `*time*`, `created`, ...), the counts of work the caches saved (LLM calls, printed on
their own: the second run should make none; texts encoded) and the model folder's hashes (its card
carries timings; the weights are compared byte for byte); markdown with timestamps and durations
masked; other files byte for byte (plots, whose metadata carry dates, are skipped). For each file
that differs its first differing lines are printed, to be read (a model card's per-stage speed
column, for one, is a timing).

    .venv/bin/python benchmarks/same_outputs.py BASE_COMMIT [--keep DIR]
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("wall", "seconds", "time", "date", "created", "started", "finished", "elapsed", "per_s", "_at",
            "identity", "sha256", "fingerprint", "llm_calls", "cache_hits", "tokens_in", "tokens_out", "tokens_evaluated",
            "cost", "encoded")  # timings; the cache's work; hashes of folders whose cards carry timings
STAMPS = re.compile(r"\d{4}-\d\d-\d\dT[\d:.+]+|identity [0-9a-f]{12}|\b\d+ s\b")  # the same in markdown
SKIPPED = {".png", ".lock"}


def _mask(text: str, paths: dict[str, str]) -> str:
    for path, name in paths.items():
        text = text.replace(path, name)
    return STAMPS.sub("~", text)


def _clean(value, paths: dict[str, str]):
    if isinstance(value, dict):
        return {k: _clean(v, paths) for k, v in value.items() if not any(word in k.lower() for word in VOLATILE)}
    if isinstance(value, list):
        return [_clean(v, paths) for v in value]
    return _mask(value, paths) if isinstance(value, str) else value


def _lines(path: Path, paths: dict[str, str]) -> list[str] | bytes:
    """The file as comparable lines (JSON cleaned and pretty-printed), or its bytes."""
    if path.suffix == ".json":
        return json.dumps(_clean(json.loads(path.read_text()), paths), indent=1, sort_keys=True).splitlines()
    if path.suffix == ".jsonl" or path.name.endswith(".journal"):
        return [json.dumps(_clean(json.loads(line), paths), sort_keys=True) for line in path.read_text().splitlines()]
    if path.suffix in (".md", ".yaml", ".txt"):
        return _mask(path.read_text(), paths).splitlines()
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


def compare(runs: dict[str, Path], masks: dict[str, dict[str, str]]) -> tuple[dict[str, set], dict[str, list[str]]]:
    """Each run's files, and for each file both have that differs, its first differing lines."""
    files = {name: {p.relative_to(d) for p in d.rglob("*") if p.is_file() and p.suffix not in SKIPPED}
             for name, d in runs.items()}
    different = {}
    for rel in sorted(files["base"] & files["new"]):
        old, new = (_lines(runs[name] / rel, masks[name]) for name in ("base", "new"))
        if old != new:
            different[str(rel)] = ["(binary)"] if isinstance(old, bytes) else list(difflib.unified_diff(old, new, n=0, lineterm=""))[2:8]
    return files, different


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base", help="the commit to compare the working tree with")
    parser.add_argument("--keep", type=Path, default=None, help="folder for both runs (default: a temp dir)")
    args = parser.parse_args()
    root = (args.keep or Path(tempfile.mkdtemp(prefix="gecko-same-"))).resolve()
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
    masks = {"base": {str(base_tree / "src"): "SRC", str(runs["base"]): "RUN"},
             "new": {str(runs["new"]): "RUN", str(ROOT / "src"): "SRC"}}
    files, different = compare(runs, masks)
    print(f"base {args.base} vs working tree; runs in {root}")
    print("LLM calls:", json.dumps({name: llm_calls(d) for name, d in runs.items()}))
    print(f"{len(files['base'] & files['new'])} files in both, {len(different)} different, {len(files['base'] ^ files['new'])} in one run only")
    for rel, lines in different.items():
        print(f"  different: {rel}")
        for line in lines:
            print(f"    {line[:200]}")
    for rel in sorted(map(str, files["base"] ^ files["new"])):
        print(f"  in one run only: {rel}")


if __name__ == "__main__":
    main()
