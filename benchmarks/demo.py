"""`gecko demo` timed from empty caches: what the README's demo figures come from.

Runs `gecko demo` in a fresh process with a new, empty GECKO_HOME (so the GGUF is assembled, the
engine calibrated, the corpus embedded and every LLM call made) and a new run folder, then prints
the machine, the wall time, each stage's time from its manifest, and the before/after table.

    .venv/bin/python benchmarks/demo.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                extra = [f for f in ("amx_bf16", "avx512_bf16") if f" {f}" in flags]
                return line.split(":", 1)[1].strip() + (f" ({', '.join(extra)})" if extra else "")
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=Path, default=None, help="run folder and GECKO_HOME under this folder (default: a temp dir)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="gecko-demo-"))
    home, run_dir = root / "home", root / "run"
    env = dict(os.environ, GECKO_HOME=str(home))
    env.pop("GECKO_LLM_CACHE", None)
    print(f"{cpu_name()}, {os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.2f}")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gecko.cli", "demo", "--out", str(run_dir)], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"gecko demo failed ({done.returncode}):\n{done.stderr[-3000:]}")
    engine = next((line for line in done.stderr.splitlines() if "LLM engine" in line), "?")
    print(engine)
    print(f"gecko demo, empty caches: {wall:.0f} s ({wall / 60:.1f} min)")
    for stage in ("generate", "relabel", "train", "eval"):
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        print(f"  {stage}: {manifest.get('wall_s', 0):.0f} s  {manifest.get('counts', {})}")
    table = done.stdout[done.stdout.find("| task"):]
    print(table[: table.find("\n\n")] if "\n\n" in table else table)


if __name__ == "__main__":
    main()
