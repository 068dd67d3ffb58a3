"""Every prompt the pipeline sends to an LLM, versioned: output records carry the prompt id.

Changing a prompt's text changes its id (a content hash is part of it), so records made with
different prompts can never be mixed up and the LLM cache never serves a stale answer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskType:
    """A kind of retrieval task: its catalogue of task descriptions and its query style.

    `label` is the line a base model completes ("Claim:", "Question:"): a short natural cue
    steers a small model far better than the instruction-like task description.
    """

    name: str
    label: str
    descriptions: tuple[str, ...]  # free-form task descriptions, as in the paper's examples
    min_words: int = 3
    max_words: int = 40


TASK_TYPES: dict[str, TaskType] = {t.name: t for t in [
    TaskType("question_answering", "Question", ("Given a query, find a passage that has the answer to the query.",
                                                "Given a question, retrieve passages that answer the question.")),
    TaskType("search_result", "Search query", ("Given a query, find a passage that might show up as a search result.",
                                               "Given a web search query, retrieve relevant passages."),
             min_words=2, max_words=16),
    TaskType("fact_checking", "Claim",
             ("Given a query, find a passage that allows you to check whether the query is true or not.",
              "Given a claim, retrieve documents that support or refute the claim."), min_words=4),
    TaskType("sentence_similarity", "Similar sentence", ("Retrieve semantically similar text.",
                                                         "Given a sentence, find a sentence with a similar meaning."),
             min_words=5),
    TaskType("keyword_query", "Keywords", ("Given a few keywords, find a passage about them.",), min_words=2,
             max_words=8),
    TaskType("title", "Title", ("Given a title, find the passage it could head.",), min_words=3, max_words=20),
]}

# Few-shot examples for the completion prompt: each passage with one query per task type, in
# one fixed block, so every passage and task type shares the same prefix (the backend
# evaluates it once and reuses it).
GENERATE_EXAMPLES: tuple[tuple[str, dict[str, str]], ...] = (
    (
        "Aspirin irreversibly inhibits the enzyme cyclooxygenase, which reduces the synthesis of "
        "prostaglandins that mediate pain, fever and inflammation. At low doses it also reduces "
        "platelet aggregation, which is why it is used to prevent heart attacks.",
        {
            "question_answering": "how does aspirin reduce inflammation?",
            "search_result": "aspirin mechanism of action",
            "fact_checking": "Low-dose aspirin lowers the risk of heart attacks by reducing platelet aggregation.",
            "sentence_similarity": "Aspirin blocks an enzyme that makes the chemicals behind pain and swelling.",
            "keyword_query": "aspirin cyclooxygenase prostaglandins",
            "title": "How aspirin inhibits cyclooxygenase",
        },
    ),
    (
        "In a cohort of 12,000 adults followed for ten years, those who slept less than six hours a "
        "night had a 48% higher risk of coronary heart disease than those who slept seven to eight "
        "hours, after adjusting for age, smoking and body mass index.",
        {
            "question_answering": "does short sleep increase the risk of heart disease?",
            "search_result": "sleep duration coronary heart disease risk",
            "fact_checking": "Sleeping under six hours a night is linked to a higher risk of heart disease.",
            "sentence_similarity": "Adults who sleep too little are more likely to develop heart disease.",
            "keyword_query": "short sleep heart disease cohort",
            "title": "Sleep duration and coronary heart disease in a ten-year cohort",
        },
    ),
    (
        "Mutations in the BRCA1 gene impair homologous recombination, the main pathway cells use to "
        "repair DNA double-strand breaks. Carriers have a lifetime risk of breast cancer of up to 70% "
        "and a markedly raised risk of ovarian cancer.",
        {
            "question_answering": "why do BRCA1 mutations increase cancer risk?",
            "search_result": "BRCA1 DNA repair breast cancer",
            "fact_checking": "BRCA1 mutation carriers have an increased risk of ovarian cancer.",
            "sentence_similarity": "Faulty BRCA1 genes stop cells from fixing broken DNA and lead to cancer.",
            "keyword_query": "BRCA1 homologous recombination",
            "title": "BRCA1 mutations, DNA repair and hereditary breast cancer",
        },
    ),
)


def _prompt_id(name: str, content: object) -> str:
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:8]
    return f"{name}@{digest}"


def _few_shot_block() -> str:
    return "".join(
        f"Passage: {passage}\n" + "".join(f"{TASK_TYPES[t].label}: {q}\n" for t, q in queries.items()) + "\n"
        for passage, queries in GENERATE_EXAMPLES
    )


def generate_prompt(passage: str, task_type: str) -> str:
    """Few-shot completion prompt for base models; the query is the completion up to a newline.

    The title is left out: small models copy it verbatim as the query.
    """
    return f"{_few_shot_block()}Passage: {passage}\n{TASK_TYPES[task_type].label}:"


def generate_chat_prompt(passage: str, task_type: str) -> str:
    """Instruction prompt for chat/instruction-tuned models; the answer is the query on one line."""
    task = TASK_TYPES[task_type]
    return (
        "You write queries for a retrieval dataset. Read the passage and the task, then write one "
        f"{task.label.lower()} for which the passage is relevant under the task. Reply with it only, "
        "on one line, without quotes or explanations.\n\n"
        f"Task: {task.descriptions[0]}\nPassage: {passage}\n{task.label}:"
    )


GENERATE_PROMPTS = {
    "completion": (_prompt_id("generate-completion-v1", generate_prompt("", "title")), generate_prompt),
    "chat": (_prompt_id("generate-chat-v1", generate_chat_prompt("", "title")), generate_chat_prompt),
}


def few_shot_queries() -> set[str]:
    return {q for _, queries in GENERATE_EXAMPLES for q in queries.values()}


# ---------------------------------------------------------------- relabel: QL and RC prompts
#
# FRet step 2 scores (query, passage) pairs two ways: query likelihood QL = log P(query |
# passage) and relevance classification RC = log P(label | query, passage). The few-shot block
# comes first and is identical for every candidate, so a backend that keeps KV state evaluates
# it once; the passage follows it. In the joint layout one pass over
# "block + Passage: p\nQuery: q\nRelevant:" gives both signals: QL from the logits at the query
# positions, RC from the logits at the last position.


@dataclass(frozen=True)
class RelevanceExample:
    passage: str
    query: str  # relevant to the passage
    unrelated: str  # on a neighbouring topic, not answered by the passage (a hard negative)


RELEVANCE_EXAMPLES: tuple[RelevanceExample, ...] = (
    RelevanceExample(GENERATE_EXAMPLES[0][0], "how does aspirin reduce inflammation?",
                     "what are the side effects of ibuprofen in children?"),
    RelevanceExample(GENERATE_EXAMPLES[2][0], "BRCA1 carriers have a higher risk of ovarian cancer.",
                     "Which drugs are used to treat lung tumours in smokers?"),
    RelevanceExample(
        "The Peace of Westphalia, signed in 1648, ended the Thirty Years' War and established the "
        "principle of state sovereignty that still shapes international law.",
        "The Thirty Years' War ended in 1648.", "causes of the French Revolution"),
    RelevanceExample(GENERATE_EXAMPLES[1][0], "sleep duration and coronary heart disease",
                     "does drinking coffee raise blood pressure?"),
    RelevanceExample(
        "During photosynthesis, chloroplasts convert light energy into chemical energy stored in "
        "glucose, splitting water and releasing oxygen as a by-product.",
        "which gas do plants release during photosynthesis?", "how do plant roots absorb nitrogen from the soil?"),
    RelevanceExample(
        "Python lists are dynamic arrays: appending is amortised constant time because the capacity "
        "grows geometrically, while inserting at the front shifts every element.",
        "time complexity of appending to a python list", "how do hash tables handle collisions?"),
)
_LABEL_PATTERN = (True, False, True, False, True, False)  # which examples show the relevant query


@dataclass(frozen=True)
class PairPrompt:
    """A few-shot prompt for scoring (query, passage) pairs.

    `prefix` is the shared few-shot block; `render(passage, query)` gives what follows it as
    (context, continuation, question): the backend scores `continuation` (the query) after
    `prefix + context` for QL and reads `labels` after the whole text for RC. `ql` / `rc` say
    which signals the layout supports (a query-first layout has no QL).
    """

    name: str
    prefix: str
    passage_first: bool
    question: str
    labels: tuple[str, str]  # (relevant, not relevant)
    ql: bool
    rc: bool

    @property
    def id(self) -> str:
        return _prompt_id(self.name, [self.prefix, self.passage_first, self.question, list(self.labels)])

    def render(self, passage: str, query: str) -> tuple[str, str, str]:
        passage, query = " ".join(passage.split()), " ".join(query.split())
        if self.passage_first:
            return f"Passage: {passage}\nQuery:", f" {query}", self.question
        return f"Query: {query}\nPassage: {passage}", "", self.question


def _pair_block(with_labels: bool, passage_first: bool, question: str, labels: tuple[str, str]) -> str:
    parts = []
    for example, relevant in zip(RELEVANCE_EXAMPLES, _LABEL_PATTERN):
        query = example.query if relevant or not with_labels else example.unrelated
        head = f"Passage: {example.passage}\nQuery: {query}" if passage_first else f"Query: {query}\nPassage: {example.passage}"
        tail = f"{question}{labels[0] if relevant else labels[1]}" if with_labels else ""
        parts.append(f"{head}{tail}\n\n")
    return "".join(parts)


# style -> (prompt name, passage first, QL, RC); an RC layout shows each example's label
PAIR_STYLES = {"joint": ("pair-joint-v1", True, True, True), "ql": ("pair-ql-v1", True, True, False),
               "rc-query-first": ("pair-rc-qf-v1", False, False, True)}
PAIR_PROMPT_STYLES = tuple(PAIR_STYLES)


def pair_prompt(style: str = "joint", labels: tuple[str, str] = (" Yes", " No"), question: str = "\nRelevant:") -> PairPrompt:
    """The pair-scoring prompt `style`: joint (QL + RC, one pass), ql (QL only, every example
    relevant) or rc-query-first (RC only, query before passage)."""
    if style not in PAIR_STYLES:
        raise ValueError(f"unknown pair prompt style {style!r}; known: joint, ql, rc-query-first")
    name, passage_first, ql, rc = PAIR_STYLES[style]
    return PairPrompt(name, _pair_block(rc, passage_first, question, labels), passage_first, question, labels, ql, rc)
