"""Read a corpus in any supported format into validated `Passage` records.

Formats: JSONL / JSONL.gz with BEIR fields (`_id` or `id`, optional `title`, `text`),
a BEIR directory (corpus.jsonl[.gz], queries.jsonl[.gz], qrels.{split}.tsv or
qrels/{split}.tsv), Parquet, CSV / TSV with a header row, and a directory of .txt/.md files.

Every bad record is reported as `"{file}:{line}: {problem}"` (Parquet: `"{file}:row {n}: ..."`)
so it can be fixed at the source; `lenient=True` skips such records and counts them by reason.
The reader writes nothing, and `load_corpus`/`check_corpus` read the whole corpus before
returning, so a stage never starts writing output for a corpus that turns out to be bad.
"""

from __future__ import annotations

import codecs
import collections
import csv
import functools
import gzip
import io
import json
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from gecko.models import DEFAULT, resolve_embedder

SUPPORTED = (".jsonl, .jsonl.gz, .parquet, .csv, .tsv, a BEIR directory (corpus.jsonl[.gz]) or a directory of "
             ".txt/.md files")
_SURROGATE = re.compile("[\udc80-\udcff]")  # undecodable bytes under errors="surrogateescape"


class CorpusError(ValueError):
    """A corpus that cannot be read as given; the message names the file and line."""


@dataclass(frozen=True)
class Passage:
    """One retrievable unit: a whole document, or one piece of a split document."""

    id: str
    doc_id: str
    title: str
    text: str


@dataclass
class CorpusSummary:
    """Counts from one pass over a corpus; `skipped` maps a reason to how many records it dropped."""

    path: str
    documents: int = 0
    passages: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)

    def to_dict(self) -> dict:
        return {"path": self.path, "documents": self.documents, "passages": self.passages, "skipped": dict(sorted(self.skipped.items()))}

    def render(self) -> str:
        lines = [f"corpus: {self.path}", f"documents: {self.documents}", f"passages: {self.passages}"]
        lines.append(f"skipped: {sum(self.skipped.values())}")
        lines += [f"  {reason}: {count}" for reason, count in sorted(self.skipped.items())]
        return "\n".join(lines)


@dataclass
class BeirDataset:
    corpus: list[Passage]
    queries: dict[str, str]  # only the queries judged in the chosen split
    qrels: dict[str, dict[str, int]]  # query id -> document id -> relevance
    qrels_file: str = ""
    absent: list[tuple[str, str]] = field(default_factory=list)  # (file:line, id) of qrels naming no corpus document


class _Bad(Exception):
    """A record-level problem: fatal when strict, skipped and counted under `reason` when lenient."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class _Fields:
    ids: tuple[str, ...]  # the first of these present in a record is its id
    title: str
    text: str


# ---------------------------------------------------------------- public API


def iter_passages(path, *, lenient: bool = False, max_tokens: int | None = None, tokenizer: str = DEFAULT,
                  text_field: str | None = None, id_field: str | None = None, title_field: str | None = None,
                  summary: CorpusSummary | None = None) -> Iterator[Passage]:
    """Stream the passages of the corpus at `path`, validating as it goes.

    With `max_tokens`, a document whose text is longer than that many tokens of `tokenizer`
    (an embedder folder, `default` = packaged MiniLM; special tokens not counted) is split on
    token boundaries, preferably at sentence ends, into passages `docid#0`, `docid#1`, ...
    whose text is a verbatim slice of the original. A document that fits keeps its id and
    text unchanged. The budget covers the text only: the title is repeated on every passage.
    A document whose title and text are both blank is skipped and counted as "empty".
    """
    if max_tokens is not None and max_tokens < 1:
        raise CorpusError(f"max_tokens must be a positive integer, got {max_tokens}")
    summary = summary if summary is not None else CorpusSummary(str(path))
    fields = _Fields((id_field,) if id_field else ("_id", "id"), title_field or "title", text_field or "text")
    tok = _tokenizer(tokenizer) if max_tokens is not None else None
    for doc_id, title, text in _documents(_records(Path(path), fields), fields, lenient, summary):
        if not title.strip() and not text.strip():
            summary.skipped["empty"] += 1
            continue
        pieces = _split(text, max_tokens, tok) if tok is not None and text.strip() else [text]
        summary.documents += 1
        summary.passages += len(pieces)
        for k, piece in enumerate(pieces):
            yield Passage(doc_id if len(pieces) == 1 else f"{doc_id}#{k}", doc_id, title, piece)


def load_corpus(path, **options) -> tuple[list[Passage], CorpusSummary]:
    """All passages of a fully validated corpus; takes the keyword arguments of `iter_passages`."""
    summary = CorpusSummary(str(path))
    return list(iter_passages(path, summary=summary, **options)), summary


def check_corpus(path, **options) -> CorpusSummary:
    """Validate a corpus and count it without keeping the passages in memory."""
    summary = CorpusSummary(str(path))
    for _ in iter_passages(path, summary=summary, **options):
        pass
    return summary


def load_beir(directory, split: str = "test", *, strict: bool = True, **options) -> BeirDataset:
    """A BEIR dataset restricted to the queries judged in `split`.

    Every qrels line must name a known query; when `strict`, also a known corpus document
    (otherwise the relevance labels would silently shrink), else such qrels are kept, as BEIR and
    mteb keep them, and listed in `absent`. `options` go to `load_corpus` (e.g. `max_tokens`;
    qrels still refer to `Passage.doc_id`).
    """
    root = Path(directory)
    if not root.is_dir():
        raise CorpusError(f"{root}: no such directory")
    corpus, _ = load_corpus(_first_existing(root, ["corpus.jsonl", "corpus.jsonl.gz"]), **options)
    queries_path = _first_existing(root, ["queries.jsonl", "queries.jsonl.gz"])
    query_fields = _Fields(("_id", "id"), "title", "text")
    all_queries = {qid: text for qid, _, text in _documents(_jsonl_records(queries_path), query_fields, False, None)}
    qrels_path = _first_existing(root, [f"qrels.{split}.tsv", f"qrels/{split}.tsv"])
    doc_ids = {p.doc_id for p in corpus}
    qrels: dict[str, dict[str, int]] = {}
    absent = []
    for loc, (qid, docid, score) in _qrels_rows(qrels_path):
        if qid not in all_queries:
            raise CorpusError(f"{loc}: query id {qid!r} is not in {queries_path.name}")
        if docid not in doc_ids:
            if strict:
                raise CorpusError(f"{loc}: corpus id {docid!r} is not in the corpus")
            absent.append((loc, docid))
        qrels.setdefault(qid, {})[docid] = score
    return BeirDataset(corpus, {qid: all_queries[qid] for qid in qrels}, qrels, str(qrels_path), absent)


# ---------------------------------------------------------------- validation and splitting


def _documents(records, fields: _Fields, lenient: bool, summary: CorpusSummary | None) -> Iterator[tuple[str, str, str]]:
    """(id, title, text) of each valid record; bad ones raise or, when lenient, are counted."""
    seen: dict[str, str] = {}
    for loc, record in records:
        try:
            if isinstance(record, _Bad):
                raise record
            doc_id, title, text = _fields_of(record, fields)
            if doc_id in seen:
                raise _Bad("duplicate-id", f"duplicate id {doc_id!r} (first at {seen[doc_id]})")
        except _Bad as bad:
            if not lenient:
                raise CorpusError(f"{loc}: {bad}") from None
            summary.skipped[bad.reason] += 1
            continue
        seen[doc_id] = loc
        yield doc_id, title, text


def _fields_of(record: dict, fields: _Fields) -> tuple[str, str, str]:
    key = next((k for k in fields.ids if k in record), None)
    doc_id = record.get(key) if key else None
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)  # numeric ids are common in JSON and Parquet
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise _Bad("missing-id", f"missing or empty id field ({' or '.join(map(repr, fields.ids))})")
    text = record.get(fields.text)
    if not isinstance(text, str):
        raise _Bad("missing-text", f"missing or non-string text field {fields.text!r}")
    title = record.get(fields.title)
    if title is not None and not isinstance(title, str):
        raise _Bad("bad-title", f"non-string title field {fields.title!r}")
    return doc_id, title or "", text


@functools.lru_cache(maxsize=4)
def _tokenizer(spec: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_embedder(spec))
    if not tok.is_fast:
        raise CorpusError(f"tokenizer {spec!r} has no fast version, which splitting needs for character offsets")
    return tok


def _split(text: str, max_tokens: int, tok) -> list[str]:
    """Verbatim slices of `text`, each at most `max_tokens` tokens; `[text]` when it already fits."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets, words = enc["offset_mapping"], enc.word_ids()
    if len(offsets) <= max_tokens:
        return [text]
    pieces, i = [], 0
    while i < len(offsets):
        j = _cut(text, offsets, words, i, min(i + max_tokens, len(offsets)))
        if i and words[i - 1] == words[i]:  # starts inside a word: its tokens may differ on their own
            while j - i > 1 and len(tok(text[offsets[i][0] : offsets[j - 1][1]], add_special_tokens=False)["input_ids"]) > max_tokens:
                j -= 1
        pieces.append(text[offsets[i][0] : offsets[j - 1][1]])
        i = j
    return pieces


def _cut(text: str, offsets, words, start: int, limit: int) -> int:
    """Where the piece starting at token `start` should end (exclusive), at most `limit`.

    Prefers, in order: a sentence end in the back half of the window, whitespace, a word
    boundary (which keeps re-tokenization identical), and finally any token.
    """
    if limit == len(offsets):
        return limit
    found: dict[str, int] = {}
    for j in range(limit, start, -1):
        gap = text[offsets[j - 1][1] : offsets[j][0]]
        if gap and not gap.isspace():
            gap = ""  # characters the tokenizer dropped, not a real space
        if gap and text[offsets[j - 1][1] - 1] in ".!?" and 2 * (j - start) > limit - start:
            return j
        if gap:
            found.setdefault("space", j)
        if words[j - 1] != words[j]:
            found.setdefault("word", j)
    return found.get("space") or found.get("word") or limit


# ---------------------------------------------------------------- readers: yield (location, dict | _Bad)


def _records(path: Path, fields: _Fields) -> Iterator[tuple[str, dict | _Bad]]:
    if not path.exists():
        raise CorpusError(f"{path}: no such file or directory")
    name = path.name.lower()
    if path.is_dir():
        corpus = [path / n for n in ("corpus.jsonl", "corpus.jsonl.gz") if (path / n).is_file()]
        return _jsonl_records(corpus[0]) if corpus else _text_dir_records(path)
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _jsonl_records(path)
    if name.endswith(".parquet"):
        return _parquet_records(path, fields)
    if name.endswith((".csv", ".tsv")):
        return _csv_records(path, fields)
    raise CorpusError(f"{path}: unsupported corpus type; expected {SUPPORTED}")


def read_jsonl(path: str | Path, error: type[Exception] = CorpusError) -> Iterator[tuple[str, dict]]:
    """(`file:line`, object) for each non-blank line of a JSONL(.gz) file; the first bad line
    raises `error("file:line: what is wrong")` (the stages' own error types subclass CorpusError)."""
    for loc, record in _jsonl_records(Path(path)):
        if isinstance(record, _Bad):
            raise error(f"{loc}: {record}")
        yield loc, record


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict | _Bad]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            for lineno, raw in enumerate(handle, 1):
                loc = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    yield loc, _Bad("non-utf8", f"invalid UTF-8 at byte {err.start + 1} of the line")
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    yield loc, _Bad("invalid-json", f"invalid JSON: {err.msg} (column {err.colno})")
                    continue
                except RecursionError:
                    yield loc, _Bad("invalid-json", "invalid JSON: nested too deeply")
                    continue
                yield loc, record if isinstance(record, dict) else _Bad("invalid-json", "expected a JSON object")
    except (OSError, EOFError, zlib.error) as err:
        raise CorpusError(f"{path}: cannot read: {err}") from None


def _csv_records(path: Path, fields: _Fields) -> Iterator[tuple[str, dict | _Bad]]:
    """CSV is RFC 4180 (quoted fields may span lines); TSV has no quoting, as in text/tab-separated-values."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    # surrogateescape keeps going past bad bytes, so lenient mode can skip just the records holding them
    lines = list(io.StringIO(data.decode("utf-8", errors="surrogateescape"), newline=""))
    bad_lines = {n for n, line in enumerate(lines, 1) if _SURROGATE.search(line)}
    tsv = path.name.lower().endswith(".tsv")
    csv.field_size_limit(sys.maxsize)  # documents can be far larger than the 128 KiB default
    reader = csv.reader(lines, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    header = next(reader, None)
    if header is None or 1 in bad_lines:
        raise CorpusError(f"{path}:1: expected a UTF-8 header row naming the columns")
    fields = _resolve_columns(path, header, fields)
    end = reader.line_num
    for row in reader:
        start, end = end + 1, reader.line_num
        bad = next((n for n in range(start, end + 1) if n in bad_lines), None)
        if bad is not None:
            yield f"{path}:{bad}", _Bad("non-utf8", "invalid UTF-8")
        elif not row:
            continue
        elif len(row) != len(header):
            yield f"{path}:{start}", _Bad("bad-row", f"expected {len(header)} fields, got {len(row)}")
        else:
            yield f"{path}:{start}", dict(zip(header, row))


def _parquet_records(path: Path, fields: _Fields) -> Iterator[tuple[str, dict | _Bad]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise CorpusError(f"{path}: cannot read Parquet: {err}") from None
    fields = _resolve_columns(path, table.schema_arrow.names, fields)
    columns = [c for c in (*fields.ids, fields.title, fields.text) if c in table.schema_arrow.names]
    row = 0
    batches = table.iter_batches(columns=columns)
    while True:
        try:  # a corrupt page shows only when its batch is read
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as err:
            raise CorpusError(f"{path}: cannot read Parquet after row {row}: {err}") from None
        if batch is None:
            return
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", record


def _resolve_columns(path: Path, columns, fields: _Fields) -> _Fields:
    """Tabular files name their columns once, so a missing column is a file error, not a record error."""
    ids = [c for c in fields.ids if c in columns]
    for label, ok, wanted in (("id", ids, fields.ids), ("text", fields.text in columns, (fields.text,))):
        if not ok:
            raise CorpusError(f"{path}: no {label} column {' or '.join(map(repr, wanted))}; columns are {list(columns)}")
    return _Fields((ids[0],), fields.title, fields.text)


def _text_dir_records(root: Path) -> Iterator[tuple[str, dict | _Bad]]:
    """One document per .txt/.md file (hidden paths ignored): id = relative path without suffix."""
    files = sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in (".txt", ".md") and p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise CorpusError(f"{root}: no corpus.jsonl[.gz] and no .txt/.md files; expected {SUPPORTED}")
    for file in files:
        data = file.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            yield f"{file}:{line}", _Bad("non-utf8", "invalid UTF-8")
            continue
        title = file.stem
        if file.suffix.lower() == ".md":
            title = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), title)
        yield str(file), {"_id": file.relative_to(root).with_suffix("").as_posix(), "title": title, "text": text}


def _qrels_rows(path: Path) -> Iterator[tuple[str, tuple[str, str, int]]]:
    """(location, (query id, corpus id, score)) per line; a header line is recognised by its non-integer score."""
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            loc, parts = f"{path}:{lineno}", line.rstrip("\r\n").split("\t")
            if not line.strip():
                continue
            if len(parts) != 3:
                raise CorpusError(f"{loc}: expected 3 tab-separated fields (query-id, corpus-id, score), got {len(parts)}")
            try:
                score = int(parts[2])
            except ValueError:
                if lineno == 1:
                    continue
                raise CorpusError(f"{loc}: score {parts[2]!r} is not an integer") from None
            yield loc, (parts[0], parts[1], score)


def _first_existing(root: Path, names: list[str]) -> Path:
    for name in names:
        if (root / name).is_file():
            return root / name
    raise CorpusError(f"{root}: missing {' or '.join(names)}")
