"""Evaluation tasks: declarative descriptions of local datasets, each type bringing its behaviour.

A task is a small frozen dataclass (name, path, split, prompt, ...) whose class fixes the task
type, main metric and behaviour, in the style of MTEB's task classes: `load()` reads and validates
its data, `score()` scores it with the built-in metrics, `mteb_dataset()` / `mteb_attrs()` hand it
to mteb's own task class. A new task type is one class here.

* `RetrievalTask`: a BEIR folder (corpus.jsonl[.gz], queries.jsonl[.gz], qrels.{split}.tsv or
  qrels/{split}.tsv); main score nDCG@10. Scored as BEIR / MTEB score it: a query's own document
  (same id) is left out of its ranking when the task says so, when mteb's task of that name does, or
  (BEIR's default) when an undeclared folder's query ids occur in its corpus; qrels naming documents
  the corpus lacks are kept (pytrec_eval counts them in the ideal ranking) and reported.
* `STSTask`: `{split}.tsv` with header `sentence1<TAB>sentence2<TAB>score[...]`, no quoting;
  main score Spearman correlation of cosine similarity with the gold score.
* `ClassificationTask`: `train.csv` and `{split}.csv` with header `text,category` (or `label`);
  main score accuracy of a logistic regression trained on embeddings (MTEB's protocol).

`KNOWN_TASKS` maps the datasets we ship (scifact, stsb, sts12..sts16, banking77) to their task
class, split, MTEB name and task prompt. `resolve_task("name", path)` uses it, or sniffs the folder
for any other name. Every problem with the input is raised as `EvalError` naming the task and,
where there is one, the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from gecko.corpus import CorpusError, Passage, load_beir
from gecko.embed import truncate
from gecko.evaluate import metrics


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message names the task, file and line."""


@dataclass(frozen=True)
class Task:
    """What to evaluate: `name` labels it in reports; `prompt` is the Gecko task description
    (`gecko.formats`; symmetric tasks put both sides in the query format).

    Each type defines `load()` (its data, validated) and `score(data, embed, prompts, dims)`:
    {dim: flat score dict} from `embed(texts, desc)`, the full-dimension embeddings, truncated to
    each Matryoshka dim; and `mteb_dataset(data)` for mteb.
    """

    name: str
    path: Path
    split: str = "test"
    prompt: str = "search result"
    mteb_name: str | None = None  # the MTEB task whose protocol and metadata this mirrors

    type: ClassVar[str] = ""
    main_metric: ClassVar[str] = ""
    symmetric: ClassVar[bool] = True  # both sides are queries (no documents)
    mteb_generic: ClassVar[str] = ""  # the MTEB task whose class and metadata an unnamed dataset borrows

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def mteb_attrs(self, data) -> dict:
        """Class attributes of the local copy of mteb's task."""
        return {}


@dataclass(frozen=True)
class RetrievalTask(Task):
    type: ClassVar[str] = "retrieval"
    main_metric: ClassVar[str] = "ndcg_at_10"
    symmetric: ClassVar[bool] = False
    mteb_generic: ClassVar[str] = "SciFact"
    k_values: tuple[int, ...] = (1, 3, 5, 10, 20, 100, 1000)  # MTEB's
    # leave a query's own document (same id) out of its ranking; None: decide from the name and data
    ignore_identical_ids: bool | None = None
    # refuse qrels that name a document the corpus lacks (default: score them as pytrec_eval does)
    strict: bool = False

    def load(self) -> "RetrievalData":
        """The judged queries of a BEIR folder, its corpus and qrels; qrels naming a document the
        corpus lacks are kept (as BEIR and mteb keep them) unless `strict`."""
        data = load_beir(self.path, self.split, strict=self.strict)
        if not data.qrels:
            raise EvalError(f"task {self.name}: {self.path}: qrels for split {self.split!r} judge no query")
        doc_ids = {p.doc_id for p in data.corpus}
        in_corpus = sum(1 for qid in data.qrels if qid in doc_ids)
        ignore, rule = identical_ids_rule(self, in_corpus)
        return RetrievalData(data.corpus, data.queries, data.qrels, ignore, rule, in_corpus, data.qrels_file, data.absent)

    def score(self, data, embed, prompts, dims):
        qids = list(data.queries)
        q = embed([prompts.query(data.queries[i], self) for i in qids], f"{self.name} queries")
        d = embed([prompts.document(p.title, p.text) for p in data.corpus], f"{self.name} documents")
        doc_ids = [p.id for p in data.corpus]
        return {dim: metrics.retrieval_scores(qids, truncate(q, dim), doc_ids, truncate(d, dim), data.qrels,
                                              self.k_values, data.ignore_identical_ids) for dim in dims}

    def mteb_dataset(self, data):
        from datasets import Dataset

        corpus = Dataset.from_dict({"id": [p.id for p in data.corpus], "title": [p.title for p in data.corpus],
                                    "text": [p.text for p in data.corpus]})
        queries = Dataset.from_dict({"id": list(data.queries), "text": list(data.queries.values())})
        return {"default": {self.split: {"corpus": corpus, "queries": queries, "relevant_docs": data.qrels, "top_ranked": None}}}

    def mteb_attrs(self, data):
        return {"k_values": tuple(self.k_values), "ignore_identical_ids": data.ignore_identical_ids}


@dataclass(frozen=True)
class STSTask(Task):
    prompt: str = "sentence similarity"
    type: ClassVar[str] = "sts"
    main_metric: ClassVar[str] = "cosine_spearman"
    mteb_generic: ClassVar[str] = "STSBenchmark"

    def load(self) -> "STSData":
        path = self.path / f"{self.split}.tsv"
        rows = _read_table(path, "\t", self)
        header = rows[0][1]
        missing = [c for c in ("sentence1", "sentence2", "score") if c not in header]
        if missing:
            raise EvalError(f"task {self.name}: {path}:1: missing column(s) {', '.join(missing)}; header is {header}")
        i1, i2, iscore = (header.index(c) for c in ("sentence1", "sentence2", "score"))
        data = STSData([], [], [])
        for lineno, row in rows[1:]:
            if len(row) != len(header):
                raise EvalError(f"task {self.name}: {path}:{lineno}: expected {len(header)} tab-separated fields, got {len(row)}")
            try:
                score = float(row[iscore])
            except ValueError:
                raise EvalError(f"task {self.name}: {path}:{lineno}: score {row[iscore]!r} is not a number") from None
            data.sentence1.append(row[i1])
            data.sentence2.append(row[i2])
            data.scores.append(score)
        if len(data.scores) < 2:
            raise EvalError(f"task {self.name}: {path}: needs at least 2 scored pairs, found {len(data.scores)}")
        return data

    def score(self, data, embed, prompts, dims):
        e1 = embed([prompts.query(t, self) for t in data.sentence1], f"{self.name} texts")
        e2 = embed([prompts.query(t, self) for t in data.sentence2], f"{self.name} texts")
        return {dim: metrics.sts_scores(truncate(e1, dim), truncate(e2, dim), data.scores) for dim in dims}

    def mteb_dataset(self, data):
        from datasets import Dataset, DatasetDict

        return DatasetDict({self.split: Dataset.from_dict({"sentence1": data.sentence1, "sentence2": data.sentence2, "score": data.scores})})


@dataclass(frozen=True)
class ClassificationTask(Task):
    prompt: str = "classification"
    train_split: str = "train"
    # MTEB's AbsTaskClassification: 10 experiments, each a logistic regression (max_iter=100)
    # trained on 8 examples per label drawn from the train split, accuracy averaged.
    n_experiments: int = 10
    samples_per_label: int = 8
    max_iter: int = 100
    seed: int = 42
    type: ClassVar[str] = "classification"
    main_metric: ClassVar[str] = "accuracy"
    mteb_generic: ClassVar[str] = "Banking77Classification"

    def load(self) -> "ClassificationData":
        train = _labelled(self.path / f"{self.train_split}.csv", self)
        test = _labelled(self.path / f"{self.split}.csv", self)
        names = _label_order(self.path, [label for _, label in train], self)
        index = {label: i for i, label in enumerate(names)}
        unseen = sorted({label for _, label in test} - set(index))
        if unseen:
            raise EvalError(f"task {self.name}: {self.path / (self.split + '.csv')}: label(s) {unseen[:5]} never "
                            f"occur in {self.train_split}.csv")
        if len(names) < 2:
            raise EvalError(f"task {self.name}: {self.path / (self.train_split + '.csv')}: needs at least 2 labels, found {len(names)}")
        return ClassificationData([t for t, _ in train], [index[l] for _, l in train], [t for t, _ in test],
                                  [index[l] for _, l in test], names)

    def score(self, data, embed, prompts, dims):
        draws = metrics.undersample(data.train_labels, self.n_experiments, self.samples_per_label, self.seed)
        union = sorted(set().union(*draws))
        train_full = embed([prompts.query(data.train_texts[i], self) for i in union], f"{self.name} train")
        row = {j: p for p, j in enumerate(union)}
        test_full = embed([prompts.query(t, self) for t in data.test_texts], f"{self.name} test")
        out = {}
        for dim in dims:
            train_dim = truncate(train_full, dim)
            out[dim] = metrics.classification_scores(
                lambda idx, m=train_dim: m[[row[j] for j in idx]], data.train_labels, truncate(test_full, dim),
                data.test_labels, n_experiments=self.n_experiments, samples_per_label=self.samples_per_label,
                max_iter=self.max_iter, seed=self.seed)
        return out

    def mteb_dataset(self, data):
        from datasets import Dataset, DatasetDict

        return DatasetDict({
            self.train_split: Dataset.from_dict({"text": data.train_texts, "label": data.train_labels}),
            self.split: Dataset.from_dict({"text": data.test_texts, "label": data.test_labels}),
        })

    def mteb_attrs(self, data):
        from sklearn.linear_model import LogisticRegression

        return {"n_experiments": self.n_experiments, "samples_per_label": self.samples_per_label,
                "train_split": self.train_split, "evaluator_model": LogisticRegression(max_iter=self.max_iter)}


TASK_TYPES: dict[str, type[Task]] = {cls.type: cls for cls in (RetrievalTask, STSTask, ClassificationTask)}


@dataclass(frozen=True)
class KnownTask:
    cls: type[Task]
    mteb_name: str
    prompt: str
    split: str = "test"


# Task descriptions: the `{task}` of the Gecko query format (`gecko.formats`).
KNOWN_TASKS: dict[str, KnownTask] = {
    "scifact": KnownTask(RetrievalTask, "SciFact", "fact checking"),
    "stsb": KnownTask(STSTask, "STSBenchmark", "sentence similarity"),
    **{f"sts{n}": KnownTask(STSTask, f"STS{n}", "sentence similarity") for n in (12, 13, 14, 15, 16)},
    "banking77": KnownTask(ClassificationTask, "Banking77Classification", "classification"),
}


# command-line words for `RetrievalTask.ignore_identical_ids`
IDENTICAL_IDS: dict[str, bool | None] = {"auto": None, "yes": True, "no": False}

# mteb's `ignore_identical_ids` for BEIR's tasks (mteb 2.26), used when mteb is not installed;
# with mteb installed its task classes are read instead (`mteb_backend.ignore_identical_ids_by_task`).
MTEB_IGNORE_IDENTICAL_IDS: dict[str, bool] = {
    **dict.fromkeys(("ArguAna", "FEVER", "FiQA2018", "MSMARCO", "QuoraRetrieval"), True),
    **dict.fromkeys(("ClimateFEVER", "DBPedia", "HotpotQA", "NFCorpus", "NQ", "SCIDOCS", "SciFact", "Touche2020",
                     "TRECCOVID"), False),
    **{f"CQADupstack{forum}Retrieval": False for forum in ("Android", "English", "Gaming", "Gis", "Mathematica",
                                                           "Physics", "Programmers", "Stats", "Tex", "Unix",
                                                           "Webmasters", "Wordpress")},
}
# BEIR folder names that do not normalise to their MTEB task's name
BEIR_FOLDERS = {"fiqa": "FiQA2018", "dbpedia-entity": "DBPedia", "webis-touche2020": "Touche2020"}


def _normal(name: str) -> str:
    """`QuoraRetrieval`, `quora` and `Quora-Retrieval` alike: lower case, alphanumerics, no `retrieval` suffix."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return key.removesuffix("retrieval") or key


def mteb_ignore_identical_ids(name: str) -> tuple[str, bool] | None:
    """(mteb task, its `ignore_identical_ids`) for a task named like an MTEB retrieval task, else None."""
    from gecko.evaluate import mteb_backend

    table = mteb_backend.ignore_identical_ids_by_task() if mteb_backend.available() else MTEB_IGNORE_IDENTICAL_IDS
    name = BEIR_FOLDERS.get(name.lower(), name)
    if name in table:
        return name, table[name]
    matches = [n for n in table if _normal(n) == _normal(name)]
    return (matches[0], table[matches[0]]) if len(matches) == 1 else None


def resolve_task(name: str, path, *, type: str | None = None, split: str | None = None) -> Task:
    """The task for `name=path`: a known dataset name, an explicit `type`, or the folder sniffed."""
    path = Path(path)
    if not name:
        raise EvalError(f"task for {path}: empty name")
    if not path.exists():
        raise EvalError(f"task {name}: {path}: no such file or directory")
    if not path.is_dir():
        raise EvalError(f"task {name}: {path}: expected a dataset folder")
    known = KNOWN_TASKS.get(name.lower())
    if type is not None:
        cls = TASK_TYPES.get(type.lower())
        if cls is None:
            raise EvalError(f"task {name}: unknown task type {type!r}; known types: {', '.join(TASK_TYPES)}")
        if known is not None and known.cls is not cls:
            known = None
    elif known is not None:
        cls = known.cls
    else:
        cls = sniff_task_type(name, path, split or "test")
    kwargs = {"name": name, "path": path, "split": split or (known.split if known else "test")}
    if known is not None:
        kwargs.update(prompt=known.prompt, mteb_name=known.mteb_name)
    return cls(**kwargs)


def parse_task_spec(spec: str) -> Task:
    """`NAME=PATH` or `NAME:TYPE=PATH` (TYPE: retrieval, sts, classification), as on the command line."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise EvalError(f"--task {spec!r}: expected NAME=PATH or NAME:TYPE=PATH")
    name, _, type_ = name.partition(":")
    return resolve_task(name, path, type=type_ or None)


def sniff_task_type(name: str, path: Path, split: str = "test") -> type[Task]:
    if any((path / f).is_file() for f in ("corpus.jsonl", "corpus.jsonl.gz")):
        return RetrievalTask
    tsv = path / f"{split}.tsv"
    if tsv.is_file() and "score" in _header(tsv, "\t"):
        return STSTask
    train, test = path / "train.csv", path / f"{split}.csv"
    if train.is_file() and test.is_file():
        header = _header(train, ",")
        if "text" in header and ("category" in header or "label" in header):
            return ClassificationTask
    raise EvalError(
        f"task {name}: cannot tell the task type of {path}: expected corpus.jsonl[.gz] (retrieval), "
        f"{split}.tsv with a score column (sts), or train.csv and {split}.csv with text,category columns "
        "(classification); or name the type: NAME:TYPE=PATH"
    )


def _header(path: Path, delimiter: str) -> list[str]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        line = handle.readline()
    return [c.strip() for c in line.rstrip("\r\n").split(delimiter)]


# ---------------------------------------------------------------- loaded data


class TaskData:
    """What `Task.load` returns; `notes` and `protocol` say how a retrieval task departs from plain BEIR."""

    def notes(self, name: str) -> list[str]:
        return []

    def protocol(self) -> dict:
        return {}


@dataclass
class RetrievalData(TaskData):
    corpus: list[Passage]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    ignore_identical_ids: bool = False
    identical_ids_rule: str = ""  # why `ignore_identical_ids` is what it is
    query_ids_in_corpus: int = 0  # judged queries whose id is also a document id
    qrels_file: str = ""
    absent: list[tuple[str, str]] = field(default_factory=list)  # (file:line, id) of qrels naming no corpus document

    def sizes(self) -> dict:
        return {"documents": len(self.corpus), "queries": len(self.queries), "qrels": sum(len(v) for v in self.qrels.values())}

    def protocol(self) -> dict:
        """How the ranking was scored, for results files."""
        return {"ignore_identical_ids": self.ignore_identical_ids, "identical_ids_rule": self.identical_ids_rule,
                "query_ids_in_corpus": self.query_ids_in_corpus,
                "qrels_absent_from_corpus": {"file": self.qrels_file, "count": len(self.absent),
                                             "first": [doc for _, doc in self.absent[:3]]}}

    def notes(self, name: str) -> list[str]:
        """One line for each departure from a plain BEIR folder, for the user to see before scoring."""
        out = []
        if self.query_ids_in_corpus:
            verb = "left out of" if self.ignore_identical_ids else "kept in"
            out.append(
                f"task {name}: {self.query_ids_in_corpus} of {len(self.queries)} query ids are also corpus ids; "
                f"each query's own document is {verb} its ranking ({self.identical_ids_rule}; --ignore-identical-ids yes/no to choose)"
            )
        if self.absent:
            first = ", ".join(f"{doc!r} ({loc.rsplit(':', 1)[1]})" for loc, doc in self.absent[:3])
            out.append(
                f"task {name}: {self.qrels_file}: {len(self.absent)} qrels line(s) name documents absent from the corpus "
                f"(first: {first}); scored as pytrec_eval scores them (they stay in the ideal ranking); --strict refuses them"
            )
        return out


@dataclass
class STSData(TaskData):
    sentence1: list[str]
    sentence2: list[str]
    scores: list[float]

    def sizes(self) -> dict:
        return {"pairs": len(self.scores)}


@dataclass
class ClassificationData(TaskData):
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    label_names: list[str] = field(default_factory=list)

    def sizes(self) -> dict:
        return {"train": len(self.train_texts), "test": len(self.test_texts), "labels": len(self.label_names)}


def load_task_data(task: Task):
    """The task's data, fully validated before anything is embedded."""
    try:
        return task.load()
    except CorpusError as err:
        raise EvalError(f"task {task.name}: {err}") from None


def identical_ids_rule(task: RetrievalTask, query_ids_in_corpus: int) -> tuple[bool, str]:
    """(leave a query's own document out of its ranking?, why): as declared, else moot when no query
    id is a corpus id, else as mteb's task of that name, else BEIR's default (leave it out)."""
    if task.ignore_identical_ids is not None:
        return task.ignore_identical_ids, "as declared"
    if not query_ids_in_corpus:
        return False, "no query id is a corpus id"
    mteb = mteb_ignore_identical_ids(task.mteb_name or task.name)
    if mteb is not None:
        return mteb[1], f"as mteb's {mteb[0]} does"
    return True, "BEIR's default for a task that does not say"


def _labelled(path: Path, task: Task) -> list[tuple[str, str]]:
    rows = _read_table(path, ",", task)
    header = rows[0][1]
    label_col = "category" if "category" in header else "label" if "label" in header else None
    if "text" not in header or label_col is None:
        raise EvalError(f"task {task.name}: {path}:1: expected columns text and category (or label); header is {header}")
    it, il = header.index("text"), header.index(label_col)
    out = []
    for lineno, row in rows[1:]:
        if len(row) != len(header):
            raise EvalError(f"task {task.name}: {path}:{lineno}: expected {len(header)} fields, got {len(row)}")
        if not row[il].strip():
            raise EvalError(f"task {task.name}: {path}:{lineno}: empty label")
        out.append((row[it], row[il]))
    if not out:
        raise EvalError(f"task {task.name}: {path}: no rows")
    return out


def _label_order(root: Path, train_labels: list[str], task: Task) -> list[str]:
    """Label ids follow categories.json when the folder has one (as the HF dataset's ClassLabel does)."""
    seen = set(train_labels)
    cats = root / "categories.json"
    if cats.is_file():
        try:
            names = json.loads(cats.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise EvalError(f"task {task.name}: {cats}:{err.lineno}: invalid JSON: {err.msg}") from None
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise EvalError(f"task {task.name}: {cats}: expected a JSON list of label names")
        extra = sorted(seen - set(names))
        if extra:
            raise EvalError(f"task {task.name}: label(s) {extra[:5]} of {task.train_split}.csv are not in {cats}")
        return [n for n in names if n in seen]
    return sorted(seen)


def _read_table(path: Path, delimiter: str, task: Task) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a CSV (RFC 4180 quoting) or TSV (no quoting); the first row is the header."""
    if not path.is_file():
        raise EvalError(f"task {task.name}: {path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise EvalError(f"task {task.name}: {path}: invalid UTF-8 at byte {err.start}") from None
    csv.field_size_limit(sys.maxsize)
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    rows, end = [], 0
    try:
        for row in reader:
            start, end = end + 1, reader.line_num
            if row:
                rows.append((start, row))
    except csv.Error as err:
        raise EvalError(f"task {task.name}: {path}:{reader.line_num}: {err}") from None
    if not rows:
        raise EvalError(f"task {task.name}: {path}:1: empty file, expected a header row")
    rows[0] = (rows[0][0], [c.strip() for c in rows[0][1]])
    return rows
