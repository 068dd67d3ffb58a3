"""Crash-safe progress for long stages: an append-only journal, then one atomic final write.

Each finished work item (a passage, a query) is one JSON line, written with a single
`write` + flush + fsync. After kill -9 the journal holds whole lines plus at most one torn
tail, which `open` cuts off; items in it are skipped on rerun, so nothing is lost or done
twice. The stage's real output is written from the journal at the end, via a temp file and
`os.replace`, so readers never see a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator


class Journal:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._entries: dict[str, dict] = {}
        self._recover()
        self._handle = self.path.open("a", encoding="utf-8")

    def _recover(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break
            self._entries[entry["key"]] = entry
            good += len(line)
        if good < len(data):  # a torn tail from a crash mid-write
            with self.path.open("r+b") as handle:
                handle.truncate(good)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> Iterator[dict]:
        return iter(self._entries.values())

    def add(self, key: str, entry: dict) -> None:
        entry = {"key": key, **entry}
        self._handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._entries[key] = entry

    def close(self) -> None:
        self._handle.close()


def replace_durably(tmp: str | Path, path: Path) -> None:
    """Rename `tmp` over `path` and fsync the folder, so the rename itself survives a power loss."""
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_jsonl_atomic(path: str | Path, records: Iterable[dict]) -> int:
    """Write JSON lines to a temp file beside `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
        handle.flush()
        os.fsync(handle.fileno())
    replace_durably(tmp, path)
    return count


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to a unique temp file beside `path`, fsync, then rename over it (removed on failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        replace_durably(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, value: object) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def pyplot():
    """matplotlib's pyplot on the Agg backend: figures go to files, never to a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure_atomic(fig, path: str | Path, dpi: float | None = None) -> Path:
    """Save a matplotlib figure beside `path`, rename it over `path`, and close the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    fig.savefig(tmp, **({} if dpi is None else {"dpi": dpi}))
    plt.close(fig)
    os.replace(tmp, path)
    return path
