"""The demo run through served LLMs: a chat-only OpenAI-compatible server, and the Batch API.

Starts llama-cpp-python's server on the packaged Gemma 3 270M (chat template chatml: the model is
a base model and has none), then runs `gecko demo` (10 of its 40 passages, top 5) twice with fresh LLM caches:

- batch: through the Files and Batches endpoints of the fake of tests/fake_openai_server.py
  (jobs answered by the real server's /v1/completions: QL and RC exact);
- chat: through the same fake of tests/fake_openai_server.py in front of it, refusing /v1/completions
  as hosted chat APIs do (generate through chat, RC from top log-probabilities, no QL).

Prices are illustrative (a price table in the config; $0.10 / $0.40 per million tokens in / out),
to show the cost table of report.md. Prints each run's stage times and usage as JSON.

    nice -n 15 .venv/bin/python benchmarks/served.py [--keep DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo import cpu_name  # noqa: E402
from fake_openai_server import FakeOpenAIServer  # noqa: E402

ALIAS = "gemma3-270m"
LIMIT, TOP_N = 10, 5  # 10 of the demo's 40 passages, top 5: the 270M model through HTTP is slow on 2 shared cores


def start_server(threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    from gecko.models import default_gguf_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(default_gguf_path()), "--model_alias", ALIAS,
           "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096", "--logits_all", "true",
           "--chat_format", "chatml", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(240):
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    raise SystemExit(f"llama_cpp.server did not start; see {log}")


def run(name: str, url: str, root: Path, options: dict, extra: list[str]) -> dict:
    from gecko.pipeline import load_config, run_pipeline

    overrides = [f"run_dir={root / name}", f"generate.limit={LIMIT}", f"relabel.top_n={TOP_N}", f"llm=openai:{url}#{ALIAS}", f"llm_cache={root / name / 'llm-cache.sqlite'}",
                 f"llm_options={json.dumps({'extra_body': {'repeat_penalty': 1.0}, **options})}",
                 "prices={%s: {input: 0.10, output: 0.40}}" % ALIAS, *extra]
    config = load_config(ROOT / "src/gecko/data/demo.yaml", overrides)
    start = time.perf_counter()
    result = run_pipeline(config, progress=False)
    wall = time.perf_counter() - start
    stages = {s.name: s.manifest.get("wall_s") for s in result.stages}
    usage = {s.name: {k: s.manifest["summary"].get(k) for k in ("llm_calls", "tokens_in", "tokens_out", "cost", "prompt_style",
                                                               "ql_unavailable", "fusion_used", "rc_bounds")}
             for s in result.stages if s.name in ("generate", "relabel")}
    return {"run": name, "wall_s": round(wall, 1), "stages_s": stages, "usage": usage, "report": str(result.report),
            "table": result.table()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["chat", "batch"], default=None)
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="gecko-served-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_name()}; runs in {root}", flush=True)
    proc, upstream = start_server(args.threads, root / "server.log")
    try:
        with FakeOpenAIServer(model=ALIAS, upstream=upstream) as proxy:
            if args.only in (None, "batch"):
                # one Batch job per generate round (all passages) and per relabel chunk
                print(json.dumps(run("batch", proxy.url, root, {"batch": True, "batch_poll_s": 1.0, "timeout": 600},
                                     [f"generate.batch_size={LIMIT}"]), indent=1), flush=True)
            if args.only in (None, "chat"):
                proxy.refuse = {"/v1/completions"}
                print(json.dumps(run("chat", proxy.url, root, {}, []), indent=1), flush=True)
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
