"""The Gecko paper's text formats, in one place: what train writes is what eval, encode, serve
and retrieve read (the ablated-best formats: the task goes in front of the query only).

    query side     task: {task} | query: {text}
    document side  title: {title} | text: {text}      (title `none` when there is none)

Symmetric tasks (STS, classification) put both sides in the query format. A trained model saves
its prompts (`query_prompt`, `DOCUMENT_PROMPT`) in sentence-transformers' config, so
`model.encode_query` / `encode_document` embed exactly these strings. `TextFormat` is how train
writes texts, `Prompts` how eval reads them (and `gecko.encode.input_format` how encode and serve do).
"""

from __future__ import annotations

from dataclasses import dataclass

GENERIC_QUERY_TASK = "search result"  # the task of `model.encode_query(x)` and of tasks that name none
DOCUMENT_PROMPT = "title: none | text: "  # `model.encode_document(x)`: a document without a title


def query_prompt(task: str) -> str:
    """The prefix that makes a query of `task`: `task: {task} | query: `."""
    return f"task: {task} | query: "


def format_query(text: str, task: str) -> str:
    return query_prompt(task) + text


def format_document(text: str, title: str = "") -> str:
    return f"title: {(title or '').strip() or 'none'} | text: {text}"


def is_document_prompt(prefix: str | None) -> bool:
    """Whether a saved document prompt is Gecko's (then the real title goes in, not `none`)."""
    return bool(prefix) and prefix.startswith("title: ")


def plain_document(text: str, title: str = "") -> str:
    """A document as MTEB and BEIR embed it for a model without prompts: title and text joined by a space."""
    title = (title or "").strip()
    return f"{title} {text}".strip() if title else text.strip()


@dataclass(frozen=True)
class TextFormat:
    """How training writes its texts: the Gecko formats above (`prompts=True`, the paper's), or
    plain texts (`prompts=False`): as a prompt-less base was trained and as MTEB embeds it, so
    the student starts from the base's own scores and its card needs no prompts."""

    prompts: bool = True

    def query(self, text: str, task: str) -> str:
        return format_query(text, task) if self.prompts else text

    def document(self, text: str, title: str = "") -> str:
        return format_document(text, title) if self.prompts else plain_document(text, title)


PROMPT_MODES = ("model", "gecko", "none")


class Prompts:
    """How eval turns a task's texts into model inputs, in one of three modes:

    * `gecko`: the formats above for every model;
    * `none`: the plain texts, as MTEB embeds models without instructions (the base model "as
      MTEB scores it");
    * `model`: as the model says to use it: the prompts saved with it (`gecko train` saves the ones
      its card recommends) by task name, then `query` for any retrieval query; a text with no saved
      prompt is embedded plain, so a model without prompts is scored exactly as in `none`.

    A task is anything with `name`, `prompt` (its task description) and `symmetric`.
    """

    def __init__(self, mode: str | bool = "gecko", saved: dict[str, str] | None = None):
        mode = {True: "gecko", False: "none"}[mode] if isinstance(mode, bool) else mode
        if mode not in PROMPT_MODES:
            raise ValueError(f"prompts must be one of {', '.join(PROMPT_MODES)}, not {mode!r}")
        self.mode = mode
        self.saved = dict(saved or {}) if mode == "model" else {}

    def query(self, text: str, task) -> str:
        """A query-side text of `task` (queries; both sides of symmetric tasks)."""
        if self.mode == "gecko":
            return format_query(text, task.prompt)
        prefix = self.saved.get(task.name) or (None if task.symmetric else self.saved.get("query"))
        return prefix + text if prefix else text

    def document(self, title: str, text: str) -> str:
        prefix = self.saved.get("document")
        if self.mode == "gecko" or is_document_prompt(prefix):
            return format_document(text, title)
        return prefix + text if prefix else plain_document(text, title)

    def describe(self, task) -> dict:
        query = self.query("{text}", task)
        return {"mode": self.mode, "query": query, "document": query if task.symmetric else self.document("{title}", "{text}")}
