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
import uuid
from contextlib import contextmanager
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


def fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: str | Path, path: Path) -> None:
    """Rename `tmp` over `path` and fsync the folder, so the rename itself survives a power loss."""
    os.replace(tmp, path)
    fsync_path(path.parent)


@contextmanager
def replacing(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A unique temp path beside `path`: synced and renamed over it on success, removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}")
    try:
        yield tmp
        fsync_path(tmp)
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_jsonl_atomic(path: str | Path, records: Iterable[dict]) -> int:
    """Write JSON lines to a temp file beside `path`, fsync, then rename over it."""
    count = 0
    with replacing(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for count, record in enumerate(records, 1):
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return count


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to a unique temp file beside `path`, fsync, then rename over it (removed on failure)."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


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

    with replacing(path, suffix=f".tmp{Path(path).suffix}") as tmp:
        fig.savefig(tmp, **({} if dpi is None else {"dpi": dpi}))
    plt.close(fig)
    return Path(path)
