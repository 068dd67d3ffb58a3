"""`gecko serve` under abuse: N clients for a fixed time mixing valid and invalid requests (issue 16).

Starts `gecko serve` (packaged MiniLM, API key on, a small corpus for /v1/search) on a free
loopback port, then runs `--clients` asyncio clients for `--duration` seconds, `--rounds` times
(the last round is reported; the first fills the allocator's pools). Each client picks its next
request at random (seeded):

    valid       /v1/embeddings or /v1/search with the key: must be 200 with one vector / result list per input
    oversized   a body over the server's cap (declared, or streamed without a length): 413
    too many    more inputs than --max-inputs: 413
    too long    an input over --max-chars: 422
    malformed   broken JSON, a JSON array, token ids, a missing field: 400
    wrong key   a wrong or missing API key: 401
    slow        a valid request whose body trickles in over a few seconds: 200
    abandoned   a client that sends half a body and hangs up: no answer expected, the server must not mind

Reports, per kind, how many were sent and answered with the expected code, the codes seen
otherwise, the server's RSS (from /proc) at the start and after each round, and whether its log
holds a traceback.

    .venv/bin/python benchmarks/serve_abuse.py [--clients 50] [--duration 60] [--rounds 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "gecko" / "data" / "sample" / "scifact-sample.jsonl"
KEY = "sk-abuse-test"
MAX_INPUTS, MAX_CHARS = 16, 2000
BODY_CAP = MAX_INPUTS * (12 * MAX_CHARS + 8) + 65_536  # ServeConfig.max_body_bytes
EXPECTED = {"valid": 200, "slow": 200, "oversized": 413, "too many": 413, "too long": 422, "malformed": 400, "wrong key": 401,
            "abandoned": None}
WEIGHTS = {"valid": 50, "slow": 3, "oversized": 5, "too many": 8, "too long": 8, "malformed": 12, "wrong key": 10, "abandoned": 4}


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def start_server(workdir: Path) -> tuple[subprocess.Popen, str, Path]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "GECKO_API_KEY": KEY, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GECKO_HOME": str(workdir / "home")}
    log = workdir / "server.log"
    cmd = [sys.executable, "-m", "gecko.cli", "serve", "--port", str(port), "--corpus", str(SAMPLE), "--max-inputs", str(MAX_INPUTS),
           "--max-chars", str(MAX_CHARS)]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url, log
        except httpx.TransportError:
            time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"server did not come up:\n{log.read_text()[-2000:]}")


def texts() -> list[str]:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    return [s.strip() for r in rows for s in r["text"].split(". ") if len(s.split()) > 3]


async def raw_request(url: str, head: bytes, body: bytes, *, chunk: int, pause: float, hang_up: bool = False) -> int | None:
    """A request written by hand on a socket: bodies that trickle in, or stop half way."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        for start in range(0, len(body), chunk):
            writer.write(body[start : start + chunk])
            await writer.drain()
            await asyncio.sleep(pause)
            if hang_up and start >= len(body) // 2:
                return None
        line = await asyncio.wait_for(reader.readline(), 120)
        return int(line.split()[1]) if line else None
    finally:
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)


async def one(http: httpx.AsyncClient, url: str, kind: str, rng: random.Random, corpus: list[str]) -> tuple[int | None, bool]:
    """(status, body as expected) of one request of `kind`."""
    auth = {"Authorization": f"Bearer {KEY}"}
    if kind == "valid":
        if rng.random() < 0.5:
            inputs = rng.sample(corpus, rng.randint(1, 4))
            r = await http.post("/v1/embeddings", json={"model": "default", "input": inputs}, headers=auth)
            return r.status_code, r.status_code == 200 and len(r.json()["data"]) == len(inputs)
        r = await http.post("/v1/search", json={"query": rng.choice(corpus), "top_k": 3}, headers=auth)
        return r.status_code, r.status_code == 200 and len(r.json()["data"][0]["results"]) == 3
    if kind == "slow":
        body = json.dumps({"input": rng.choice(corpus)}).encode()
        head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        status = await raw_request(url, head, body, chunk=max(1, len(body) // 20), pause=0.15)
        return status, status == 200
    if kind == "abandoned":
        body = json.dumps({"input": [rng.choice(corpus)] * 4}).encode()
        head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        await raw_request(url, head, body, chunk=max(1, len(body) // 4), pause=0.1, hang_up=True)
        return None, True
    if kind == "oversized":
        body = json.dumps({"input": "x " * (BODY_CAP // 2 + 1000)}).encode()
        if rng.random() < 0.5:
            r = await http.post("/v1/embeddings", content=body, headers=auth)
        else:
            async def chunks():
                for start in range(0, len(body), 65_536):
                    yield body[start : start + 65_536]
            r = await http.post("/v1/embeddings", content=chunks(), headers=auth)
        return r.status_code, r.status_code == 413
    if kind == "too many":
        r = await http.post("/v1/embeddings", json={"input": ["a text"] * (MAX_INPUTS + rng.randint(1, 100))}, headers=auth)
        return r.status_code, r.status_code == 413
    if kind == "too long":
        r = await http.post("/v1/embeddings", json={"input": ["ok", "y" * (MAX_CHARS + rng.randint(1, 5000))]}, headers=auth)
        return r.status_code, r.status_code == 422
    if kind == "malformed":
        body = rng.choice([b'{"input": "unterminated', b"[1, 2]", b'{"input": [1, 2, 3]}', b'{"model": "m"}', b"\xff\xfe\x00",
                           b'{"input": "x", "dimensions": "big"}', b'{"query": 5}', b"{" * 50_000])
        path = "/v1/search" if body == b'{"query": 5}' else "/v1/embeddings"
        r = await http.post(path, content=body, headers={**auth, "Content-Type": "application/json"})
        return r.status_code, r.status_code == 400 and "error" in r.json()
    if kind == "wrong key":
        headers = rng.choice([{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + KEY}, {"Authorization": "Bearer"}])
        r = await http.post("/v1/embeddings", json={"input": "x"}, headers=headers)
        return r.status_code, r.status_code == 401
    raise ValueError(kind)


async def abuse(url: str, clients: int, duration: float, seed: int) -> dict:
    corpus = texts()
    sent: collections.Counter = collections.Counter()
    right: collections.Counter = collections.Counter()
    other: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    latencies: list[float] = []
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        stop = time.perf_counter() + duration

        async def client(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.perf_counter() < stop:
                kind = rng.choices(kinds, weights)[0]
                sent[kind] += 1
                start = time.perf_counter()
                try:
                    status, ok = await one(http, url, kind, rng, corpus)
                except (httpx.HTTPError, OSError, asyncio.TimeoutError, ValueError, KeyError) as err:
                    status, ok = f"{type(err).__name__}", False
                if kind == "valid":
                    latencies.append(time.perf_counter() - start)
                if ok:
                    right[kind] += 1
                else:
                    other[kind][str(status)] += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
    return {"sent": sent, "right": right, "other": other, "latencies": latencies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of abuse")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of --duration; the last is reported")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gecko-abuse-") as tmp:
        proc, url, log = start_server(Path(tmp))
        try:
            # two rounds: the first grows the allocator's pools to the load's high-water mark; a
            # leak keeps growing in the second, which is the one reported
            rss = [rss_kb(proc.pid)]
            for i in range(args.rounds):
                result = asyncio.run(abuse(url, args.clients, args.duration, args.seed + i))
                rss.append(rss_kb(proc.pid))
            before, after = rss[-2], rss[-1]
            alive = httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        server_log = log.read_text()
    sent, right, other = result["sent"], result["right"], result["other"]
    lat = sorted(result["latencies"])
    print(f"{args.clients} clients x {args.duration:.0f} s on loopback (the last of {args.rounds} rounds), seed {args.seed}, load average {os.getloadavg()[0]:.1f}\n")
    print("| request | sent | answered as expected | expected | otherwise |")
    print("|---|---:|---:|---|---|")
    for kind in WEIGHTS:
        others = ", ".join(f"{code} x{n}" for code, n in other[kind].most_common()) or "-"
        expected = EXPECTED[kind] or "(hangs up; none)"
        print(f"| {kind} | {sent[kind]} | {right[kind]} ({100 * right[kind] / max(sent[kind], 1):.1f}%) | {expected} | {others} |")
    total = sum(sent.values())
    print(f"| **all** | {total} | {sum(right.values())} ({100 * sum(right.values()) / max(total, 1):.1f}%) | | |")
    if lat:
        print(f"\nvalid requests: p50 {1000 * lat[len(lat) // 2]:.0f} ms, p99 {1000 * lat[int(len(lat) * 0.99)]:.0f} ms")
    print(f"server RSS (MiB) at start and after each round: {', '.join(f'{r / 1024:.0f}' for r in rss)}; the last round: "
          f"{before / 1024:.0f} before, {after / 1024:.0f} after ({(after - before) / 1024:+.0f} MiB); "
          f"healthy after: {alive}; tracebacks in its log: {server_log.count('Traceback')}")
    blocks = server_log.split("Traceback (most recent call last):")[1:]
    for last, n in collections.Counter(next((x for x in reversed(b.strip().splitlines()) if x.strip()), "") for b in blocks).most_common(5):
        print(f"- traceback x{n}, ending: {last[:200]}")


if __name__ == "__main__":
    main()
