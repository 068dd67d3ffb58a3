"""Load test of `gecko serve`: N concurrent clients for a fixed time against a real server on loopback.

Starts `gecko serve` (packaged MiniLM, API key on) in a subprocess on a free port, waits for
/healthz, then runs `--clients` asyncio clients, each sending POST /v1/embeddings with one short
text (a SciFact query) and the next as soon as it is answered, for `--duration`
seconds. Reports errors (any non-200 or transport failure), p50/p99 latency, throughput and how
many requests the micro-batcher put in one forward pass (from /healthz). The clients run in this
process on the same machine as the server, so they compete with it for CPU.

    .venv/bin/python benchmarks/serve_load.py [--clients 50] [--duration 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gzip
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
KEY = "sk-load-test"


def load_texts() -> list[str]:
    with gzip.open(DATA / "scifact" / "queries.jsonl.gz", "rt") as handle:
        return [json.loads(line)["text"] for line in handle]


def start_server(threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "GECKO_API_KEY": KEY, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gecko.cli", "serve", "--port", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.25)
    proc.kill()
    raise SystemExit("server did not come up")


async def load(url: str, texts: list[str], clients: int, duration: float) -> tuple[list[float], collections.Counter, float]:
    latencies: list[float] = []
    errors: collections.Counter = collections.Counter()  # what went wrong -> how often
    headers = {"Authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as http:
        await http.post("/v1/embeddings", json={"model": "default", "input": texts[0]})  # warm-up
        stop = time.perf_counter() + duration

        async def client(seed: int) -> None:
            rng = random.Random(seed)
            while time.perf_counter() < stop:
                start = time.perf_counter()
                try:
                    r = await http.post("/v1/embeddings", json={"model": "default", "input": rng.choice(texts)})
                    if r.status_code != 200 or len(r.json()["data"]) != 1:
                        errors[f"HTTP {r.status_code}: {r.text[:200]}"] += 1
                except httpx.HTTPError as err:
                    errors[f"{type(err).__name__}: {err}"] += 1
                latencies.append(time.perf_counter() - start)

        begin = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - begin
    return latencies, errors, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    args = parser.parse_args()
    texts = load_texts()
    proc, url = start_server(args.threads)
    try:
        before = httpx.get(f"{url}/healthz").json()["batching"]
        latencies, errors, elapsed = asyncio.run(load(url, texts, args.clients, args.duration))
        after = httpx.get(f"{url}/healthz").json()["batching"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ms = np.array(latencies) * 1000
    batches = after["batches"] - before["batches"] - 1  # minus the warm-up
    print(f"{args.clients} clients, {elapsed:.1f} s, one text per request, server torch threads {args.threads}, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| requests | errors | requests/s | p50 latency (ms) | p99 latency (ms) | requests per forward pass (mean) |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(ms)} | {sum(errors.values())} | {len(ms) / elapsed:.1f} | {np.percentile(ms, 50):.0f} | {np.percentile(ms, 99):.0f} | "
          f"{len(ms) / max(batches, 1):.1f} |")
    for error, count in errors.most_common():
        print(f"error x{count}: {error}")


if __name__ == "__main__":
    main()
