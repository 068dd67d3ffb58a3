"""`gecko encode`: embed every text of a file (`encode_file`), as a query or a document (`input_format`).

Batching, the model and Matryoshka truncation are `gecko.embed.Embedder`'s (shared with `gecko serve`).
`encode_file` streams: it reads `chunk_size` texts, embeds them, appends them to the output and
drops them, so memory does not grow with the input. The output is written beside its final path
and renamed over it at the end, so a reader never sees half a file and a failed run leaves none.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from gecko.corpus import CorpusError, CorpusSummary, Passage, iter_passages
from gecko.embed import EmbedError, Embedder
from gecko.formats import format_document, is_document_prompt, plain_document, query_prompt
from gecko.journal import replacing
from gecko.models import DEFAULT

AS_CHOICES = ("query", "document")
OUTPUT_SUFFIXES = (".npy", ".parquet")


@dataclass(frozen=True)
class InputFormat:
    """How a passage becomes model input: `text(passage)`, to which sentence-transformers prepends `prompt`."""

    prompt: str | None = None
    gecko_document: bool = False  # the title goes into Gecko's document format

    def text(self, passage: Passage) -> str:
        return (format_document if self.gecko_document else plain_document)(passage.text, passage.title)


def input_format(embedder: Embedder, as_: str | None = None, task: str | None = None) -> InputFormat:
    """`--as query|document` picks the model's saved prompt of that name (none when it has none);
    `--task TEXT` is a query with the Gecko prompt for TEXT; neither embeds texts as given."""
    if as_ not in (None, *AS_CHOICES):
        raise EmbedError(f"as {as_!r}: expected one of {', '.join(AS_CHOICES)}")
    if task is not None:
        if as_ == "document":
            raise EmbedError("--task builds a query prompt; it cannot be combined with --as document")
        if not task.strip():
            raise EmbedError("--task must not be empty")
        return InputFormat(query_prompt(task.strip()))
    if as_ is None:
        return InputFormat()
    prompt = embedder.prompts.get(as_)
    if as_ == "document" and is_document_prompt(prompt):
        return InputFormat(gecko_document=True)  # `title: none | text: x` for untitled passages, as the prompt gives
    return InputFormat(prompt)


@dataclass
class EncodeSummary:
    input: str
    out: str
    ids: str | None  # the .npy output's ids file; Parquet holds the ids itself
    texts: int = 0
    dim: int = 0
    seconds: float = 0.0
    skipped: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        rate = self.texts / self.seconds if self.seconds else 0.0
        return {**self.__dict__, "seconds": round(self.seconds, 3), "texts_per_s": round(rate, 1)}

    def render(self) -> str:
        d = self.to_dict()
        lines = [f"encoded {d['texts']} texts → {d['out']} (dim {d['dim']}) in {d['seconds']:.1f} s, {d['texts_per_s']} texts/s"]
        if self.ids:
            lines.append(f"ids: {self.ids}")
        lines += [f"skipped {reason}: {n}" for reason, n in sorted(self.skipped.items())]
        return "\n".join(lines)


def encode_file(input, out, encoder: Embedder | str = DEFAULT, *, dims: int | None = None, as_: str | None = None,
                task: str | None = None, chunk_size: int = 8192, lenient: bool = False, text_field: str | None = None,
                id_field: str | None = None, progress: bool = True) -> EncodeSummary:
    """Embed every text of `input` into `out` (.npy plus `*.ids.json`, or .parquet with columns id, embedding).

    `input`: a .txt file (one text per line, id = line number; blank lines skipped) or any corpus
    `gecko.corpus.iter_passages` reads (JSONL, Parquet, CSV/TSV, BEIR or .txt/.md folder), whose
    bad records stop the run with `file:line: problem` unless `lenient`.
    """
    from tqdm.auto import tqdm

    out, input = Path(out), Path(input)
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise EmbedError(f"{out}: output must end in {' or '.join(OUTPUT_SUFFIXES)}")
    if chunk_size < 1:
        raise EmbedError(f"chunk_size must be positive, got {chunk_size}")
    if not input.exists():  # before the model loads
        raise CorpusError(f"{input}: no such file or directory")
    if not isinstance(encoder, Embedder):
        encoder = Embedder(encoder, cache=False, progress=False)
    encoder.check_dims(dims)
    fmt = input_format(encoder, as_, task)
    dim = dims or encoder.dim
    corpus = CorpusSummary(str(input))
    passages = _read_texts(input, lenient=lenient, text_field=text_field, id_field=id_field, summary=corpus)
    writer = _NpyWriter(out, dim) if suffix == ".npy" else _ParquetWriter(out, dim)
    summary = EncodeSummary(str(input), str(out), str(writer.ids_path) if suffix == ".npy" else None, dim=dim)
    start = time.perf_counter()
    with writer, tqdm(desc="encoding", unit="text", disable=not progress) as bar:
        for chunk in _chunks(passages, chunk_size):
            emb = encoder.encode([fmt.text(p) for p in chunk], fmt.prompt, dims)
            writer.write([p.id for p in chunk], emb)
            summary.texts += len(chunk)
            bar.update(len(chunk))
        if not summary.texts:
            raise EmbedError(f"{input}: no texts to encode")
    summary.seconds = time.perf_counter() - start
    summary.skipped = dict(corpus.skipped)
    return summary


def ids_path(npy: str | Path) -> Path:
    """Where the ids of a .npy output go: OUT.ids.json beside OUT.npy."""
    return Path(npy).with_suffix(".ids.json")


def load_embeddings(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(ids, embeddings) of an `encode_file` output, .npy with its ids file or .parquet.

    A .npy whose ids file is missing (a run stopped between its two renames) or names another
    number of rows is an EmbedError: the pair is never used mismatched."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path, columns=["id", "embedding"])
            emb = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
            return table.column("id").to_pylist(), emb.reshape(table.num_rows, -1)
        emb = np.load(path, mmap_mode="r")
        ids = json.loads(ids_path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise EmbedError(f"{err.filename}: no such file (an encode run stopped before it finished? run it again)") from None
    except (OSError, ValueError) as err:
        raise EmbedError(f"{path}: not an encode output: {err}") from None
    if not isinstance(ids, list) or len(ids) != emb.shape[0]:
        count = len(ids) if isinstance(ids, list) else "no list of"
        raise EmbedError(f"{ids_path(path)}: {count} ids for the {emb.shape[0]} rows of {path}: not a pair written together")
    return ids, emb


# ---------------------------------------------------------------- input


def _read_texts(path: Path, *, lenient: bool, text_field, id_field, summary: CorpusSummary) -> Iterator[Passage]:
    if path.is_file() and path.suffix.lower() == ".txt":
        return _text_lines(path, lenient, summary)
    return iter_passages(path, lenient=lenient, text_field=text_field, id_field=id_field, summary=summary)


def _text_lines(path: Path, lenient: bool, summary: CorpusSummary) -> Iterator[Passage]:
    """One text per line of a plain text file; the id is the line number, so ids point back at the source."""
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                if not lenient:
                    raise CorpusError(f"{path}:{lineno}: invalid UTF-8 at byte {err.start + 1} of the line") from None
                summary.skipped["non-utf8"] += 1
                continue
            if not text.strip():
                summary.skipped["empty"] += 1
                continue
            summary.documents += 1
            summary.passages += 1
            yield Passage(str(lineno), str(lineno), "", text)


def _chunks(items: Iterator[Passage], size: int) -> Iterator[list[Passage]]:
    items = iter(items)
    return iter(lambda: list(itertools.islice(items, size)), [])


# ---------------------------------------------------------------- output


class _NpyWriter:
    """A float32 .npy written row chunk by row chunk; the header, of fixed size, gets the row count at the end.

    The ids go to `NAME.ids.json` (a JSON array, row i ↔ id i): ids may hold any character. Two
    files cannot be renamed at once, so the ids file commits the pair: the old one is removed
    before the new .npy replaces the old, and the new one is renamed in last. A crash between
    leaves a .npy without ids, which `load_embeddings` refuses, never a mismatched pair.
    """

    HEADER = 128  # bytes, a multiple of 64 as the .npy format asks

    def __init__(self, path: Path, dim: int):
        self.path, self.dim, self.rows = path, dim, 0
        self.ids_path = ids_path(path)
        self._done = False
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        # exits run in reverse: close the .npy, remove the old ids, rename the .npy, then the ids
        self._ids = self._stack.enter_context(open(self._stack.enter_context(replacing(self.ids_path)), "w", encoding="utf-8"))
        npy = self._stack.enter_context(replacing(self.path))
        self._stack.callback(self._uncommit)
        self._npy = self._stack.enter_context(open(npy, "wb"))
        self._npy.write(self._header())
        self._ids.write("[")
        return self

    def _uncommit(self) -> None:
        """Before the new .npy replaces the old one: the old ids no longer name its rows."""
        if self._done:
            self.ids_path.unlink(missing_ok=True)

    def _header(self) -> bytes:
        text = repr({"descr": "<f4", "fortran_order": False, "shape": (self.rows, self.dim)})
        size = self.HEADER - 10
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", size) + text.ljust(size - 1).encode("latin1") + b"\n"

    def write(self, ids: list[str], emb: np.ndarray) -> None:
        self._npy.write(np.ascontiguousarray(emb, dtype="<f4").tobytes())
        sep = "," if self.rows else ""
        self._ids.write(sep + ",".join(json.dumps(i, ensure_ascii=False) for i in ids))
        self.rows += len(ids)

    def __exit__(self, *exc):
        self._done = exc[0] is None
        if self._done:
            self._ids.write("]\n")
            self._npy.seek(0)
            self._npy.write(self._header())
            self._npy.seek(0, os.SEEK_END)
        return self._stack.__exit__(*exc)


class _ParquetWriter:
    """Columns `id` (string) and `embedding` (fixed-size list of float32), one row group per chunk."""

    def __init__(self, path: Path, dim: int):
        import pyarrow as pa

        self.path, self.dim = path, dim
        self.schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        import pyarrow.parquet as pq

        self._writer = pq.ParquetWriter(str(self._stack.enter_context(replacing(self.path))), self.schema)
        return self

    def write(self, ids: list[str], emb: np.ndarray) -> None:
        import pyarrow as pa

        values = pa.array(np.ascontiguousarray(emb, dtype=np.float32).ravel(), type=pa.float32())
        column = pa.FixedSizeListArray.from_arrays(values, self.dim)
        self._writer.write_table(pa.Table.from_arrays([pa.array(ids, pa.string()), column], schema=self.schema))

    def __exit__(self, *exc):
        self._writer.close()  # writes the footer; the temp file is dropped anyway when exc is set
        return self._stack.__exit__(*exc)
