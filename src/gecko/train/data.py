"""Training data: read each source, turn it into formatted (anchor, positive, negatives) examples,
and mix the sources by weight.

Sources (`DataSpec.kind`, sniffed from the path when "auto"):

* `examples`: JSONL (.jsonl, .jsonl.gz) or Parquet with columns `task`, `query`, `positive` and
  optional `negative` (a text or a list), `positive_title`, `negative_title`, `task_type`,
  `symmetric` -- the output of `gecko relabel`, or any pairs / triples file with those columns.
* `sts`: an STS folder (`{split}.tsv`) or .tsv file, header `sentence1, sentence2, score`: pairs with
  score >= `min_score` become (s1, s2) positives, both sides in the query format.
* `classification`: a folder (`{split}.csv`) or .csv file with `text` and `category` (or `label`):
  each text x becomes a triple (x, another x with the same label, an x with another label), and
  one unique id is appended to all three texts so in-batch negatives cannot be false negatives
  (the Gecko paper's trick).
* `beir`: a BEIR folder with `qrels.{split}.tsv`: one (query, judged document) pair per qrel.

Formats (`gecko.formats`, the paper's, unless `TrainConfig.prompts` is off: then plain texts): query side `task: {task} | query: {text}`, document side
`title: {title} | text: {text}` (title `none` when there is none); symmetric tasks (STS,
classification, and rows with task_type `sentence_similarity` or `symmetric: true`) use the query
format on both sides. Rows are dropped, and counted by reason, when a text is empty or the
positive repeats the query; negatives equal to the query or positive are removed.
"""

from __future__ import annotations

import collections
import csv
import io
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from gecko.corpus import Passage, read_jsonl
from gecko.formats import TextFormat
from gecko.train.config import DataSpec

KINDS = ("examples", "sts", "classification", "beir")
DEFAULT_TASKS = {"sts": "sentence similarity", "classification": "classification", "beir": "search result"}


class TrainDataError(ValueError):
    """Training data that cannot be used as given; the message names the file and line."""


def teacher_score(scores: dict[str, float | None], teacher: str, retriever_weight: float) -> float | None:
    """One candidate's teacher score. ql+retriever = QL + retriever_weight x cosine: with
    retriever_weight = t_r / t_s the teacher's softmax at t_r is the product of QL's softmax at t_r
    and the base retriever's at the student's temperature t_s (relabel's QL + retriever fusion beat
    either alone as a re-ranker: README, relabel)."""
    if teacher == "ql+retriever":
        ql, retriever = scores.get("ql"), scores.get("retriever")
        return None if ql is None or retriever is None else ql + retriever_weight * retriever
    return scores.get(teacher)


@dataclass
class Example:
    """One formatted training example: the texts exactly as the model sees them.

    `candidates`: the relabeled query's top-N passages (formatted, in the LLM's fused order) with
    their teacher scores, for the listwise distillation term; empty for other sources."""

    anchor: str
    positive: str
    negatives: list[str] = field(default_factory=list)
    candidates: list[tuple[str, dict[str, float]]] = field(default_factory=list)


@dataclass
class SourceData:
    """A data source read and converted: its examples plus the counts for the model card."""

    spec: DataSpec
    name: str
    kind: str
    task: str | None  # the task used for every row (None: per row, from the file)
    examples: list[Example]
    rows: int = 0  # source rows read (pairs, qrels, labelled texts)
    dropped: collections.Counter = field(default_factory=collections.Counter)
    symmetric: bool | str = False  # True, False or "per row"
    corpus: list = field(default_factory=list)  # the passages of the corpus it names (title, text): for the principal axes

    @property
    def max_negatives(self) -> int:
        return max((len(e.negatives) for e in self.examples), default=0)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "path": str(self.spec.path),
            "kind": self.kind,
            "task": self.task if self.task is not None else "per row",
            "symmetric": self.symmetric,
            "weight": self.spec.weight,
            "rows": self.rows,
            "examples": len(self.examples),
            "with_negatives": sum(1 for e in self.examples if e.negatives),
            "max_negatives": self.max_negatives,
            "dropped": dict(sorted(self.dropped.items())),
        }


# ---------------------------------------------------------------- sources


def sniff_kind(path: Path, split: str = "train") -> str:
    name = path.name.lower()
    if path.is_dir():
        if any((path / f).is_file() for f in ("corpus.jsonl", "corpus.jsonl.gz")):
            return "beir"
        if (path / f"{split}.tsv").is_file():
            return "sts"
        if (path / f"{split}.csv").is_file():
            return "classification"
        raise TrainDataError(f"{path}: cannot tell the data kind: no corpus.jsonl[.gz], {split}.tsv or {split}.csv")
    if name.endswith((".jsonl", ".jsonl.gz", ".parquet")):
        return "examples"
    if name.endswith(".tsv"):
        return "sts"
    if name.endswith(".csv"):
        return "classification"
    raise TrainDataError(f"{path}: unsupported training data; expected .jsonl[.gz] / .parquet examples, "
                         "an STS .tsv or folder, a classification .csv or folder, or a BEIR folder")


def load_source(spec: DataSpec, seed: int = 0, fmt: TextFormat = TextFormat()) -> SourceData:
    path = Path(spec.path)
    if not path.exists():
        raise TrainDataError(f"{path}: no such file or directory")
    kind = spec.kind if spec.kind != "auto" else sniff_kind(path, spec.split)
    if kind not in KINDS:
        raise TrainDataError(f"{path}: unknown data kind {kind!r}; known: {', '.join(KINDS)}")
    name = spec.name or _default_name(path)
    loader = {"examples": _load_examples, "sts": _load_sts, "classification": _load_classification, "beir": _load_beir}[kind]
    source = loader(spec, path, name, seed, fmt)
    if not source.examples:
        raise TrainDataError(f"{path}: no usable training examples (dropped: {dict(source.dropped) or 'none'})")
    return source


def _default_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".parquet", ".tsv", ".csv"):
        name = name.removesuffix(suffix)
    if name in ("train", "dev", "test") and path.parent.name:
        name = path.parent.name
    return name or "data"


def _known_task(name: str) -> str | None:
    from gecko.evaluate.tasks import KNOWN_TASKS

    known = KNOWN_TASKS.get(name.lower())
    return known.prompt if known else None


def _task_for(spec: DataSpec, name: str, kind: str) -> str:
    return spec.task or _known_task(name) or DEFAULT_TASKS[kind]


def _clean(value) -> str:
    return value.strip() if isinstance(value, str) else ""


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    try:  # numpy arrays from Parquet list columns
        return list(value)
    except TypeError:
        return [value]


def _candidate_scores(loc: str, row: dict) -> list[tuple[str, dict[str, float]]]:
    """(passage id, teacher scores) of a relabeled row's candidates, best fused first."""
    rows = row.get("candidates") or []
    try:
        ordered = sorted(rows, key=lambda c: c["rank"])
        return [(str(c["id"]), {"ql": c.get("ql"), "ql-mean": c.get("ql_mean"), "fused": c["fused"],
                                "retriever": c["retriever_score"]}) for c in ordered]
    except (KeyError, TypeError):
        raise TrainDataError(f"{loc}: 'candidates' must be gecko relabel's list of {{id, rank, fused, ql, ql_mean, "
                             "retriever_score}") from None


def _passages(path: str) -> dict[str, Passage]:
    from gecko.corpus import CorpusError, load_corpus

    try:
        return {p.id: p for p in load_corpus(path)[0]}
    except CorpusError as err:
        raise TrainDataError(str(err)) from None


def _load_examples(spec: DataSpec, path: Path, name: str, seed: int, fmt: TextFormat) -> SourceData:
    source = SourceData(spec, name, "examples", spec.task, [], symmetric="per row" if spec.symmetric is None else spec.symmetric)
    passages = _passages(spec.corpus) if spec.corpus else None
    if passages is not None:
        source.corpus = list(passages.values())
    for loc, row in _table_rows(path):
        if spec.limit is not None and source.rows >= spec.limit:
            break
        source.rows += 1
        task = _clean(row.get("task")) or (spec.task or "")
        query, positive = _clean(row.get("query")), _clean(row.get("positive"))
        if "query" not in row or "positive" not in row:
            raise TrainDataError(f"{loc}: missing column 'query' or 'positive' (columns: {sorted(row)})")
        if not task:
            raise TrainDataError(f"{loc}: no task (give a `task` column, or DataSpec.task for the whole file)")
        if not query or not positive:
            source.dropped["empty_text"] += 1
            continue
        if query == positive:
            source.dropped["positive_equals_query"] += 1
            continue
        symmetric = spec.symmetric
        if symmetric is None:
            symmetric = bool(row.get("symmetric")) or row.get("task_type") == "sentence_similarity"
        negatives = [_clean(n) for n in _as_list(row.get("negative"))]
        titles = [_clean(t) for t in _as_list(row.get("negative_title"))]
        if symmetric:
            doc = lambda text, title: fmt.query(text, task)  # noqa: E731
        else:
            doc = fmt.document
        anchor = fmt.query(query, task)
        pos = doc(positive, _clean(row.get("positive_title")))
        kept: list[str] = []
        for i, neg in enumerate(negatives):
            if not neg:
                continue
            text = doc(neg, titles[i] if i < len(titles) else "")
            if neg in (query, positive) or text in (anchor, pos):
                source.dropped["negative_equals_query_or_positive"] += 1
                continue
            if text not in kept:
                kept.append(text)
        if spec.max_negatives is not None:
            kept = kept[: spec.max_negatives]
        candidates = []
        if passages is not None:
            for pid, scores in _candidate_scores(loc, row):
                if pid not in passages:
                    raise TrainDataError(f"{loc}: candidate {pid!r} is not in the corpus {spec.corpus}")
                candidates.append((doc(passages[pid].text, passages[pid].title), scores))
        source.examples.append(Example(anchor, pos, kept, candidates))
    return source


def _load_sts(spec: DataSpec, path: Path, name: str, seed: int, fmt: TextFormat) -> SourceData:
    file = path / f"{spec.split}.tsv" if path.is_dir() else path
    task = _task_for(spec, name, "sts")
    source = SourceData(spec, name, "sts", task, [], symmetric=True)
    for loc, row in _delimited_rows(file, "\t"):
        if spec.limit is not None and source.rows >= spec.limit:
            break
        for column in ("sentence1", "sentence2", "score"):
            if column not in row:
                raise TrainDataError(f"{loc}: STS data needs columns sentence1, sentence2, score; got {sorted(row)}")
        source.rows += 1
        try:
            score = float(row["score"])
        except ValueError:
            raise TrainDataError(f"{loc}: score {row['score']!r} is not a number") from None
        a, b = _clean(row["sentence1"]), _clean(row["sentence2"])
        if not a or not b:
            source.dropped["empty_text"] += 1
        elif score < spec.min_score:
            source.dropped[f"score_below_{spec.min_score:g}"] += 1
        elif a == b:
            source.dropped["identical_pair"] += 1
        else:
            source.examples.append(Example(fmt.query(a, task), fmt.query(b, task)))
    return source


def _load_classification(spec: DataSpec, path: Path, name: str, seed: int, fmt: TextFormat) -> SourceData:
    file = path / f"{spec.split}.csv" if path.is_dir() else path
    task = _task_for(spec, name, "classification")
    texts: list[tuple[str, str]] = []
    for loc, row in _delimited_rows(file, ","):
        label_col = "category" if "category" in row else "label" if "label" in row else None
        if "text" not in row or label_col is None:
            raise TrainDataError(f"{loc}: classification data needs columns text and category (or label); got {sorted(row)}")
        texts.append((_clean(row["text"]), _clean(str(row[label_col]))))
    source = SourceData(spec, name, "classification", task, [], rows=len(texts), symmetric=True)
    source.examples = classification_triples(texts, task, name=name, seed=seed, limit=spec.limit, dropped=source.dropped, fmt=fmt)
    return source


def classification_triples(
    texts: list[tuple[str, str]],
    task: str,
    *,
    name: str = "cls",
    seed: int = 0,
    limit: int | None = None,
    dropped: collections.Counter | None = None,
    fmt: TextFormat = TextFormat(),
) -> list[Example]:
    """(x, x+ same label, x- other label) for each labelled text x, with one unique id appended to
    all three texts: `{text} (id {name}-{n})`, then `fmt`'s query format on all three (symmetric task).

    x+ and x- are drawn with `random.Random(seed)`; x+ is never x itself (by text), x- never shares
    x's label. Texts whose label has no other text are dropped (counted as `singleton_label`).
    """
    dropped = dropped if dropped is not None else collections.Counter()
    rng = random.Random(seed)
    by_label: dict[str, list[str]] = collections.defaultdict(list)
    cleaned = []
    for text, label in texts:
        if not text or not label:
            dropped["empty_text"] += 1
            continue
        cleaned.append((text, label))
        by_label[label].append(text)
    labels = sorted(by_label)
    if len(labels) < 2:
        raise TrainDataError(f"{name}: classification data needs at least two labels, found {len(labels)}")
    order = list(range(len(cleaned)))
    rng.shuffle(order)
    out: list[Example] = []
    for n, i in enumerate(order):
        if limit is not None and len(out) >= limit:
            break
        text, label = cleaned[i]
        same = [t for t in by_label[label] if t != text]
        if not same:
            dropped["singleton_label"] += 1
            continue
        positive = rng.choice(same)
        other = rng.choice([lab for lab in labels if lab != label])
        negative = rng.choice(by_label[other])
        uid = f" (id {name}-{n})"
        out.append(Example(fmt.query(text + uid, task), fmt.query(positive + uid, task), [fmt.query(negative + uid, task)]))
    return out


def _load_beir(spec: DataSpec, path: Path, name: str, seed: int, fmt: TextFormat) -> SourceData:
    from gecko.corpus import CorpusError, load_beir

    try:
        data = load_beir(path, split=spec.split)
    except CorpusError as err:
        raise TrainDataError(str(err)) from None
    task = _task_for(spec, name, "beir")
    docs = {p.doc_id: p for p in data.corpus}
    source = SourceData(spec, name, "beir", task, [], symmetric=bool(spec.symmetric))
    if not spec.symmetric:
        source.corpus = list(data.corpus)
    for qid in data.qrels:
        for docid, score in data.qrels[qid].items():
            if spec.limit is not None and source.rows >= spec.limit:
                break
            source.rows += 1
            if score <= 0:
                source.dropped["not_relevant"] += 1
                continue
            query, passage = data.queries[qid].strip(), docs[docid]
            if not query or not passage.text.strip():
                source.dropped["empty_text"] += 1
                continue
            positive = fmt.query(passage.text, task) if spec.symmetric else fmt.document(passage.text, passage.title)
            source.examples.append(Example(fmt.query(query, task), positive))
    return source


# ---------------------------------------------------------------- readers


def _table_rows(path: Path) -> Iterator[tuple[str, dict]]:
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several types
            raise TrainDataError(f"{path}: cannot read Parquet: {err}") from None
        n = 0
        for batch in table.iter_batches():
            for record in batch.to_pylist():
                n += 1
                yield f"{path}:row {n}", record
        return
    yield from read_jsonl(path, TrainDataError)


def _delimited_rows(path: Path, delimiter: str) -> Iterator[tuple[str, dict]]:
    if not path.is_file():
        raise TrainDataError(f"{path}: no such file")
    csv.field_size_limit(sys.maxsize)
    text = path.read_text(encoding="utf-8-sig")
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    header = next(reader, None)
    if not header:
        raise TrainDataError(f"{path}:1: expected a header row")
    start = reader.line_num
    for row in reader:
        line, start = start + 1, reader.line_num
        if not row:
            continue
        if len(row) != len(header):
            raise TrainDataError(f"{path}:{line}: expected {len(header)} fields, got {len(row)}")
        yield f"{path}:{line}", dict(zip(header, row))


# ---------------------------------------------------------------- mixture


@dataclass
class Mixture:
    """The examples of one epoch per source, after weighting (repeats / subsampling)."""

    sources: list[SourceData]
    per_source: dict[str, list[Example]]

    def counts(self) -> dict[str, int]:
        return {name: len(rows) for name, rows in self.per_source.items()}

    @property
    def total(self) -> int:
        return sum(self.counts().values())


def build_mixture(sources: list[SourceData], *, examples_per_epoch: int | None = None, seed: int = 0) -> Mixture:
    """Weighted mixture: source i contributes round(w_i * n_i) examples per epoch (its examples each
    used w_i times on average: 1 = once, 0.5 = a random half, 3 = three times), scaled so the epoch
    holds `examples_per_epoch` examples when given. Repeats are whole reshuffled passes plus a
    random part-pass; the draw is fixed by `seed`, so a resumed run sees the same epoch.
    """
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise TrainDataError(f"data source names must be unique, got {names} (give each a name=)")
    wanted = {s.name: s.spec.weight * len(s.examples) for s in sources}
    total = sum(wanted.values())
    if total <= 0:
        raise TrainDataError("all data weights are zero")
    scale = examples_per_epoch / total if examples_per_epoch else 1.0
    per_source: dict[str, list[Example]] = {}
    for index, source in enumerate(sources):
        count = int(round(wanted[source.name] * scale))
        if count <= 0:
            continue
        rng = random.Random(seed * 1000003 + index)
        rows: list[Example] = []
        while len(rows) < count:
            order = list(range(len(source.examples)))
            rng.shuffle(order)
            rows.extend(source.examples[i] for i in order[: count - len(rows)])
        per_source[source.name] = rows
    return Mixture(sources, per_source)


def listwise_extras(example: Example, size: int) -> list[str]:
    """The candidates that complete [positive, *negatives] to a list of `size` texts for the KL
    term: spread evenly over the rest of the fused order, best and worst included."""
    known = {example.positive, *example.negatives}
    others = [text for text, _ in example.candidates if text not in known]
    want = max(0, size - 1 - len(example.negatives))
    if len(others) > want:
        others = [others[round(i * (len(others) - 1) / max(want - 1, 1))] for i in range(want)] if want else []
    return others


def to_columns(examples: list[Example], negatives: int, *, count_column: bool, listwise: int = 0,
               teacher: str = "ql", retriever_weight: float = 0.0) -> dict[str, list]:
    """Dataset columns: anchor, positive, negative_1..negative_k and (when `count_column`) `label`
    = how many of the negative columns are real. Missing negatives are filled with the row's own
    positive (a duplicate inside its row, never seen across rows) and masked by the loss.

    `listwise` = L > 0 adds candidate_1..candidate_(L-1-k) (`listwise_extras`) and makes `label` a row [negative count, teacher score of the positive,
    of each negative column, of each candidate column], NaN where a text has no score (padding,
    or a row without candidates): what `ListwiseDistillLoss` reads."""
    columns: dict[str, list] = {"anchor": [], "positive": []}
    for k in range(negatives):
        columns[f"negative_{k + 1}"] = []
    extras = max(0, listwise - 1 - negatives)
    for k in range(extras):
        columns[f"candidate_{k + 1}"] = []
    if count_column or listwise:
        columns["label"] = []
    for example in examples:
        columns["anchor"].append(example.anchor)
        columns["positive"].append(example.positive)
        real = example.negatives[:negatives]
        for k in range(negatives):
            columns[f"negative_{k + 1}"].append(real[k] if k < len(real) else example.positive)
        if not listwise:
            if count_column:
                columns["label"].append(len(real))
            continue
        others = listwise_extras(Example(example.anchor, example.positive, real, example.candidates), listwise)[:extras]
        for k in range(extras):
            columns[f"candidate_{k + 1}"].append(others[k] if k < len(others) else example.positive)
        score = {text: teacher_score(scores, teacher, retriever_weight) for text, scores in example.candidates}
        nan = float("nan")
        teacher_row = [score.get(example.positive), *(score.get(real[k]) if k < len(real) else None for k in range(negatives)),
                       *(score.get(others[k]) if k < len(others) else None for k in range(extras))]
        columns["label"].append([float(len(real)), *(nan if t is None else float(t) for t in teacher_row)])
    return columns
