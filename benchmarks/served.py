"""The demo run (`gecko run` on gecko/data/demo.yaml) through served LLMs: a chat-only
OpenAI-compatible server, and the Batch API.

The server is llama-cpp-python's, on the packaged Gemma 3 270M. That model is a *base* model with
no chat template, and a chat template it never saw (chatml) makes it answer chat requests with
empty or preamble text; so the server's chat endpoint renders a request's messages *raw*: their
texts one after the other, a blank line between, no role markers (`raw_chat_format`, registered
as chat format "raw" in the server's process). The chat endpoint is then the model's completion
with the chat API around it: gecko's side is its real chat path. In front of it, the fake of
tests/fake_openai_server.py (real HTTP) stands in for a hosted chat API: it refuses
/v1/completions, so the probe finds no prompt log-probabilities: generate goes through chat (the
instruction prompt), RC comes from the label token's top-20 chat log-probabilities, QL is
unavailable and relabel fuses RC with the retriever. Two runs:

- chat: live calls;
- batch: `llm_options: {batch: true}`: the requests of each call become one job through the fake's
  Files and Batches endpoints (as on OpenAI's Batch API), run on the real server's chat endpoint.

Each run is the whole pipeline (generate, relabel, train, eval) with fresh run folders and LLM
caches; by default at the demo's size (40 passages, top 10). Prices are illustrative ($0.10 /
$0.40 per million tokens in / out; Batch calls at half), to fill the cost table of report.md.
Prints each run's stages, LLM usage and eval table as JSON.

    nice -n 15 .venv/bin/python benchmarks/served.py [--only chat|batch] [--keep DIR] [--limit 40] [--top-n 10]
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
PRICE = {"input": 0.10, "output": 0.40}


def raw_chat_format(messages: list[dict], **_) -> "object":
    """The messages' texts as plain completion text: a base model's chat endpoint without a template."""
    from llama_cpp.llama_chat_format import ChatFormatterResponse

    texts = [m["content"] if isinstance(m["content"], str) else "".join(p.get("text", "") for p in m["content"])
             for m in messages if m.get("content")]
    return ChatFormatterResponse(prompt="\n\n".join(texts))


class _LogprobRows:
    """The log-softmax of the logit rows asked for, computed when asked.

    llama-cpp-python (0.3.36, `Llama._create_completion`) takes the log-softmax of *every* prompt
    position's logits (prompt length x 262k words) and then keeps only the rows from the first
    generated token on; served this way it computes the same returned numbers for those rows alone."""

    def __init__(self, logits, log_softmax):
        self.logits, self.log_softmax = logits, log_softmax

    def __getitem__(self, rows):
        return self.log_softmax(self.logits[rows])


def serve(argv: list[str]) -> None:
    """llama_cpp.server with the "raw" chat format registered (run in the server's own process),
    its log-probabilities computed only for the rows it returns (`_LogprobRows`)."""
    import numpy as np
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import register_chat_format
    from llama_cpp.server.__main__ import main as server_main

    register_chat_format("raw")(raw_chat_format)
    full = Llama.logits_to_logprobs
    Llama.logits_to_logprobs = staticmethod(
        lambda logits, axis=-1: _LogprobRows(logits, full) if np.ndim(logits) == 2 and axis == -1 else full(logits, axis))
    sys.argv = ["llama_cpp.server", *argv]
    server_main()


def start_server(threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    from gecko.models import default_gguf_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, __file__, "--serve", "--model", str(default_gguf_path()), "--model_alias", ALIAS,
           "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096", "--logits_all", "true",
           "--chat_format", "raw", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(480):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    raise SystemExit(f"the server did not start; see {log}")


def run(name: str, url: str, root: Path, options: dict, overrides: list[str]) -> dict:
    """`gecko run` on the demo config with this server as its LLM; the stages' LLM usage and the eval."""
    from gecko.pipeline import load_config, run_pipeline

    options = {"extra_body": {"repeat_penalty": 1.0}, "timeout": 600, "batch_dir": str(root / name / "batches"), **options}
    overrides = [f"run_dir={root / name}", f"llm=openai:{url}#{ALIAS}", f"llm_cache={root / name / 'llm-cache.sqlite'}",
                 f"llm_options={json.dumps(options)}", f"prices={json.dumps({ALIAS: PRICE})}", *overrides]
    config = load_config(ROOT / "src/gecko/data/demo.yaml", overrides)
    start = time.perf_counter()
    result = run_pipeline(config, progress=False)
    wall = time.perf_counter() - start
    keys = ("passages", "accepted", "queries", "examples", "positive_changed", "pairs_scored", "llm_calls", "llm_cache_hits",
            "tokens_in", "tokens_out", "cost", "prompt_style", "ql_unavailable", "fusion_used", "rc_bounds")
    usage = {s.name: {k: s.manifest["summary"][k] for k in keys if k in s.manifest["summary"]}
             for s in result.stages if s.name in ("generate", "relabel")}
    return {"run": name, "wall_s": round(wall, 1), "stages_s": {s.name: s.manifest.get("wall_s") for s in result.stages},
            "usage": usage, "report": str(result.report), "table": result.table()}


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        return serve(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=Path, default=None, help="folder for the runs (default: a new temporary one)")
    parser.add_argument("--threads", type=int, default=1, help="the server's threads")
    parser.add_argument("--only", choices=["chat", "batch"], default=None)
    parser.add_argument("--limit", type=int, default=None, help="passages to generate for (default: the demo's 40)")
    parser.add_argument("--top-n", type=int, default=None, help="relabel candidates per query (default: the demo's 10)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="gecko-served-"))
    root.mkdir(parents=True, exist_ok=True)
    sizes = ([f"generate.limit={args.limit}"] if args.limit else []) + ([f"relabel.top_n={args.top_n}"] if args.top_n else [])
    print(f"CPU: {cpu_name()}; runs in {root}", flush=True)
    proc, upstream = start_server(args.threads, root / f"server-{args.only or 'both'}.log")
    try:
        with FakeOpenAIServer(model=ALIAS, upstream=upstream) as proxy:
            proxy.refuse = {"/v1/completions"}  # chat only, as hosted APIs (and their Batch API) are
            if args.only in (None, "chat"):
                print(json.dumps(run("chat", proxy.url, root, {}, sizes), indent=1), flush=True)
            if args.only in (None, "batch"):
                # one Batch job per generate round (all passages in one batch) and per relabel chunk
                print(json.dumps(run("batch", proxy.url, root, {"batch": True, "batch_poll_s": 1.0},
                                     ["generate.batch_size=1000", *sizes]), indent=1), flush=True)
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
