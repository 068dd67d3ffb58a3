"""`--engine ray` on a local 2-CPU Ray cluster with the real packaged LLM: the same records as the
local engine (generate and relabel), shards whose manifest matches them, the actors' LLM calls
merged into the driver's cache, and actor processes killed with SIGKILL mid-run (both stages)
whose batches are retried with nothing lost or duplicated."""

from __future__ import annotations

import gzip
import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
import psutil  # noqa: E402  (a dependency of ray)
import torch  # noqa: E402

from gecko.generate import GenerateConfig, run_generate  # noqa: E402
from gecko.llm import load_llm
from gecko.llm.engine import choose_engine  # noqa: E402
from gecko.relabel import RelabelConfig, load_generated, run_relabel  # noqa: E402
from gecko.retrieve import RetrieveConfig  # noqa: E402
from gecko.scale import RayConfig, ScaleError, run_generate_ray, run_relabel_ray  # noqa: E402
from test_relabel import FAST, make_slice  # noqa: E402

torch.set_num_threads(1)
GENERATE = GenerateConfig(batch_size=1)  # six Ray batches that come back one by one: a kill lands between them


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the workers
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_generate(shared_data, tmp_path_factory):
    """6 SciFact passages through the local engine: (corpus, output, summary, cache file)."""
    root = tmp_path_factory.mktemp("local-generate")
    corpus = root / "corpus.jsonl"
    with gzip.open(shared_data / "scifact" / "corpus.jsonl.gz", "rt") as src, corpus.open("w") as dst:
        for _, line in zip(range(6), src):
            dst.write(line)
    llm = load_llm("default", cache=root / "cache.sqlite", n_threads=1)
    summary = run_generate(corpus, root / "generated.jsonl", llm, GENERATE, progress=False)
    llm.cache.close()
    return corpus, root / "generated.jsonl", summary, root / "cache.sqlite"


def _cache_rows(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT key, value FROM calls"))


def _shards(folder: Path) -> tuple[dict, bytes]:
    """The manifest, after checking it against the files, and the shards' bytes in order."""
    import hashlib

    manifest = json.loads((folder / "manifest.json").read_text())
    data = b""
    for shard in manifest["shards"]:
        raw = (folder / shard["path"]).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == shard["sha256"]
        assert raw.count(b"\n") == shard["records"]
        data += raw
    assert sum(s["records"] for s in manifest["shards"]) == manifest["records"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["manifest.json", *(s["path"] for s in manifest["shards"])])
    return manifest, data


def test_output_must_be_a_named_shard_folder(tmp_path):
    with pytest.raises(ScaleError, match="NAME.jsonl or NAME.parquet"):
        run_generate_ray(tmp_path / "corpus.jsonl", tmp_path / "generated", progress=False)


def _map_workers(name: str) -> list[psutil.Process]:
    """Ray Data actor processes of this test's cluster (descendants of this process) running `name`."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if name in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _run_killing_actors(stage, output: str, root: Path, attempts: int = 3):
    """(stage(folder)'s result, folder, journal lines at the kill): `stage` writes `output` in a new
    folder under `root` (its cache there too) from a thread, and the Ray Data actor processes are
    SIGKILLed once they exist and either the first result is journaled or they have worked 3 s
    (loading the LLM is most of their run). A run that ends before any actor process is seen (a
    loaded machine can starve this poll) is repeated in a new folder: the kill is what is tested."""
    for attempt in range(attempts):
        folder = root / f"try{attempt}"
        folder.mkdir(parents=True)
        journal = folder / f"{output}.journal"
        outcome: dict = {}

        def run():
            try:
                outcome["result"] = stage(folder)
            except BaseException as err:  # re-raised below
                outcome["error"] = err

        thread = threading.Thread(target=run)
        thread.start()
        deadline, started = time.time() + 300, None
        while time.time() < deadline and thread.is_alive():
            if started is None and _map_workers("MapWorker"):
                started = time.time()
            if journal.exists() and journal.read_text() or (started is not None and time.time() - started > 3):
                break
            time.sleep(0.05)
        workers = _map_workers("MapWorker")  # Ray Data's actor processes; the only pool running now
        done = journal.read_text().count("\n") if journal.exists() else 0
        for proc in workers:
            os.kill(proc.pid, signal.SIGKILL)
        thread.join(600)
        if "error" in outcome:
            raise outcome["error"]
        if workers:
            return outcome["result"], folder, done
    pytest.fail(f"no actor process was found to kill in {attempts} runs")


def test_generate_on_ray_survives_killed_actors_with_the_local_records(cluster, local_generate, tmp_path):
    corpus, local_out, local_summary, local_cache = local_generate
    # 6 batches of 1 passage on 2 actors: the actors' start-up is most of the run, then the batches come
    # back ~0.5 s apart (measured; batches of 2 came back nearly together, and a poll could miss them)
    summary, folder, done_at_kill = _run_killing_actors(
        lambda folder: run_generate_ray(corpus, folder / "generated.jsonl", "default", GENERATE, RayConfig(actors=2, shard_size=2),
                                        cache=folder / "cache.sqlite", progress=False), "generated.jsonl", tmp_path)
    out, journal = folder / "generated.jsonl", folder / "generated.jsonl.journal"
    assert done_at_kill < 6, "the kill came after the last batch"
    manifest, data = _shards(out)
    assert data == local_out.read_bytes()  # the shards, concatenated, are the local file: nothing lost or twice
    keys = [json.loads(line)["key"] for line in journal.read_text().splitlines()]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 6  # each passage journaled exactly once
    assert manifest["records"] == summary.accepted == local_summary.accepted
    assert [s["records"] for s in manifest["shards"]] == [2] * (summary.accepted // 2) + [1] * (summary.accepted % 2)
    assert manifest["stage"] == "generate" and manifest["llm"].startswith(choose_engine().backend + ":") and manifest["duplicate_results_dropped"] == 0
    assert (summary.passages, summary.passages_with_query, summary.rejected, summary.llm_calls, summary.tokens_out) == (
        6, local_summary.passages_with_query, local_summary.rejected, local_summary.llm_calls, local_summary.tokens_out)
    # every call is in the driver's cache, under the local engine's keys (the killed batches' calls came again)
    assert _cache_rows(folder / "cache.sqlite") == _cache_rows(local_cache)
    # relabel reads the shard folder like the file
    fields = lambda records: [(r.id, r.seed_id, r.task_type, r.task, r.query) for r in records]  # noqa: E731
    assert fields(load_generated(out)) == fields(load_generated(local_out))


def test_relabel_on_ray_survives_killed_actors_with_the_local_records(cluster, shared_data, tmp_path):
    generated, corpus = make_slice(shared_data, tmp_path / "data")
    config = RelabelConfig(top_n=4, score=FAST, retrieve=RetrieveConfig(cache_dir=str(tmp_path / "emb")))
    llm = load_llm("default", cache=tmp_path / "local-cache.sqlite", n_threads=1)
    local = run_relabel(generated, corpus, tmp_path / "local.jsonl", llm, config, progress=False)
    ray_config = RayConfig(actors=2, batch_size=1, shard_size=4)
    summary, folder, done_at_kill = _run_killing_actors(
        lambda folder: run_relabel_ray(generated, corpus, folder / "relabeled.jsonl", "default", config, ray_config,
                                       cache=folder / "cache.sqlite", progress=False), "relabeled.jsonl", tmp_path)
    out, journal = folder / "relabeled.jsonl", folder / "relabeled.jsonl.journal"
    assert done_at_kill < 6, "the kill came after the last query"
    manifest, data = _shards(out)
    assert data == (tmp_path / "local.jsonl").read_bytes()  # nothing lost or twice, and the local engine's records
    keys = [json.loads(line)["key"] for line in journal.read_text().splitlines()]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 6  # each query journaled exactly once
    assert [s["records"] for s in manifest["shards"]] == [4, 2] and manifest["stage"] == "relabel"
    assert (summary.examples, summary.pairs_scored) == (local.examples, local.pairs_scored) == (6, 24)
    assert _cache_rows(folder / "cache.sqlite") == _cache_rows(tmp_path / "local-cache.sqlite")
    # a rerun finds every query journaled: no Ray work, same output
    again = run_relabel_ray(generated, corpus, out, "default", config, ray_config, cache=folder / "cache.sqlite", progress=False)
    assert again.pairs_scored == 0 and _shards(out)[1] == data


def test_several_openai_servers_share_the_batches_under_one_identity(cluster, tmp_path):
    from fake_openai_server import FakeOpenAIServer, echo_any
    from gecko.llm.openai import PROBE_PROMPTS

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": f"Protein folding study number {i} in yeast cells."})
                              + "\n" for i in range(8)))
    answer = {"choices": [{"index": 0, "text": " How does protein folding change in yeast cells?", "finish_reason": "stop"}]}
    with FakeOpenAIServer() as one, FakeOpenAIServer() as two:
        # the probe's prompts get real prompt log-probabilities (completions mode), the rest the fixed answer
        one.responder = two.responder = lambda body: echo_any(body) if body["prompt"] in PROBE_PROMPTS else answer
        out = tmp_path / "generated.jsonl"
        summary = run_generate_ray(corpus, out, f"openai:{one.url},{two.url}#fake-model", GenerateConfig(batch_size=1),
                                   RayConfig(actors=2, num_cpus=0.5), cache=tmp_path / "cache.sqlite", progress=False)
        served = [sum(r["path"] == "/v1/completions" and r["body"]["prompt"] not in PROBE_PROMPTS for r in s.requests)
                  for s in (one, two)]  # each actor's backend probes its server once when it opens
    manifest, data = _shards(out)
    identity = f"openai:{one.url},{two.url}#fake-model"
    assert manifest["llm"] == identity and {json.loads(line)["model"] for line in data.splitlines()} == {identity}
    assert summary.passages == 8 and min(served) > 0 and sum(served) == summary.llm_calls  # both servers got batches
