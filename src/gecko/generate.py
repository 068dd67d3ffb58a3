"""FRet step 1: the LLM reads each passage and writes a query for a sampled task.

Per passage and query slot, the task type is drawn uniformly (seeded by the passage id, so
the draw does not depend on processing order), a task description is taken from the type's
catalogue, and the LLM completes a few-shot prompt. Its answer is parsed strictly; a rejected
answer is retried with another seed up to `max_attempts` times. Progress goes to a journal so
kill -9 and a rerun of the same command lose and repeat nothing.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from tqdm import tqdm

from gecko.corpus import Passage, load_corpus
from gecko.journal import Journal, write_json_atomic, write_jsonl_atomic
from gecko.llm import LLM, GenerationParams, LLMError
from gecko.llm.usage import BudgetExceeded, UsageMeter, usage_line
from gecko.options import option
from gecko.prompts import GENERATE_PROMPTS, TASK_TYPES, few_shot_queries

PREAMBLE = re.compile(r"^(here (is|are)|sure\b|certainly|okay\b|of course|the (following|query|answer) (is|are)|"
                      r"(query|task|passage|answer|question)\s*\d*\s*:|i (think|would|will|can)\b|as an ai|"
                      r"below (is|are))", re.IGNORECASE)
# meta-references instead of content: "Which of the following statements is true?"
GENERIC = re.compile(r"\b(this|the|that) (passage|text|study|article|paper|abstract|claim|query|question|sentence)\b|"
                     r"\bthe following\b", re.IGNORECASE)
WORD = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*", re.UNICODE)
# the passages `gecko run` writes queries for, drawn uniformly from a bigger corpus (its `generate.sample`):
# on SciFact every run trained on all 5,183 abstracts' queries scored below its twin on 1,500 abstracts' on
# test at 384 dims and none gained on dev, while this sample's queries scored level with the 1,500's
# (benchmarks/RESULTS.md, "A passage budget"); past it, LLM hours buy nothing measured
PASSAGE_SAMPLE = 3000


@dataclass(frozen=True)
class GenerateConfig:
    task_types: tuple[str, ...] = option(tuple(TASK_TYPES), "subset of the task-type catalogue (default: all)")
    per_passage: int = option(1, "accepted queries wanted per passage")
    seed: int = 0
    max_attempts: int = option(3, "tries per query before giving up on it")
    temperature: float = option(0.7, "sampling temperature (retries draw new seeds)")
    top_p: float = option(0.95, "nucleus sampling: the most likely tokens that hold this much probability")
    max_tokens: int = option(48, "tokens the LLM may write per answer")
    max_passage_words: int = option(300, "passages are cut to this many words in the prompt")
    prompt_style: str = option("completion", "few-shot completion (base models) or an instruction (chat-tuned models)",
                               choices=tuple(GENERATE_PROMPTS))
    batch_size: int = option(8, "passages per journal commit")

    def __post_init__(self):
        unknown = [t for t in self.task_types if t not in TASK_TYPES]
        if unknown:
            raise ValueError(f"unknown task type(s) {unknown}; known: {sorted(TASK_TYPES)}")
        if self.prompt_style not in GENERATE_PROMPTS:
            raise ValueError(f"unknown prompt style {self.prompt_style!r}; known: {sorted(GENERATE_PROMPTS)}")
        for name in ("per_passage", "max_attempts", "max_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class GeneratedQuery:
    """One accepted (task, query) for a seed passage: a row of generated.jsonl."""

    id: str
    seed_id: str
    task_type: str
    task: str
    query: str
    prompt_id: str
    model: str
    temperature: float
    top_p: float
    max_tokens: int
    sampling_seed: int
    attempt: int
    raw: str


@dataclass
class GenerateSummary:
    passages: int = 0
    corpus_passages: int = 0  # in the corpus, before limit and sample
    passages_with_query: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)
    task_mix: Counter = field(default_factory=Counter)
    mean_query_words: float = 0.0
    llm_calls: int = 0
    llm_cache_hits: int = 0
    tokens_in: int = 0  # prompt tokens the LLM was sent (uncached calls)
    tokens_out: int = 0  # tokens it generated
    cost: float | None = None  # estimated US dollars (None: no price for this LLM)
    prompt_style: str | None = None  # the prompt style used, when the LLM made it differ from the config's
    wall_s: float = 0.0

    def render(self) -> str:
        rate = self.passages_with_query / max(self.passages, 1)
        lines = [
            f"passages: {self.passages}" + (f" of the corpus's {self.corpus_passages}" if self.corpus_passages > self.passages else "")
            + f" ({self.passages_with_query} with an accepted query, {rate:.1%})",
            f"accepted queries: {self.accepted}, mean {self.mean_query_words:.1f} words",
            f"rejected: {sum(self.rejected.values())}"
            + "".join(f"\n  {reason}: {n}" for reason, n in self.rejected.most_common()),
            "task mix: " + ", ".join(f"{t} {n}" for t, n in sorted(self.task_mix.items())),
            usage_line(self)
            + (f"\nprompt style: {self.prompt_style} (the LLM generates through chat)" if self.prompt_style else ""),
            f"wall time: {self.wall_s:.1f} s ({self.passages / max(self.wall_s, 1e-9):.2f} passages/s)",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "rejected": dict(self.rejected), "task_mix": dict(self.task_mix)}


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def _overlap(a: Sequence[str], b: Sequence[str]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / max(len(sa | sb), 1)


def _longest_shared_run(query: list[str], passage: list[str]) -> int:
    """Length of the longest run of query words that appears verbatim in the passage."""
    text = " " + " ".join(passage) + " "
    best = 0
    for start in range(len(query)):
        for end in range(start + best + 1, len(query) + 1):
            if " " + " ".join(query[start:end]) + " " in text:
                best = end - start
            else:
                break
    return best


def parse_query(raw: str, task_type: str, passage: Passage, examples: set[str]) -> tuple[str | None, str | None]:
    """The query in an LLM completion, or None and the reason it was rejected.

    Reasons: empty, preamble, not_text, too_short, too_long, copy_of_example, copy_of_passage,
    off_topic (no content word in common with the passage: "What is the claim?").
    """
    if "\n" in raw.strip():  # a stop at newline failed: the model ran on
        raw = raw.strip().split("\n", 1)[0]
    text = raw.strip().strip("\"'`“”‘’").strip()
    if not text:
        return None, "empty"
    if PREAMBLE.match(text) or GENERIC.search(text):
        return None, "preamble"
    tokens = words(text)
    letters = sum(ch.isalpha() for ch in text)
    if not tokens or letters < 0.5 * len(text) or "http" in text.lower() or "<" in text:
        return None, "not_text"
    spec = TASK_TYPES[task_type]
    if len(tokens) < spec.min_words:
        return None, "too_short"
    if len(tokens) > spec.max_words:
        return None, "too_long"
    if any(_overlap(tokens, words(e)) >= 0.8 or _longest_shared_run(tokens, words(e)) >= 5 for e in examples):
        return None, "copy_of_example"
    passage_words = words(passage.text)
    title_words = words(passage.title)
    copies_title = bool(title_words) and _overlap(tokens, title_words) >= 0.8
    copies_span = len(tokens) >= 6 and _longest_shared_run(tokens, passage_words) >= 0.8 * len(tokens)
    if copies_title or copies_span:
        return None, "copy_of_passage"
    if not {w for w in tokens if len(w) >= 4} & set(passage_words + title_words):
        return None, "off_topic"
    return text, None


def derive_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big")


def check_passage_choice(limit: int | None, sample: int | None) -> None:
    """`select_passages`' arguments, checked where a config is built (before any work) and where they are used."""
    for name, value in (("limit", limit), ("sample", sample)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1 (or null for every passage), got {value}")


def select_passages(passages: list[Passage], limit: int | None = None, sample: int | None = None,
                    seed: int = 0) -> list[Passage]:
    """The passages a run writes queries for: the first `limit`, then a uniform sample of `sample`
    of them, in corpus order. A passage is drawn by its seeded id alone, so the corpus's order does
    not bias the sample and a larger sample holds a smaller one (its journaled queries are reused)."""
    check_passage_choice(limit, sample)
    if limit is not None:
        passages = passages[:limit]
    if sample is not None and len(passages) > sample:
        drawn = sorted(range(len(passages)), key=lambda i: (derive_seed(seed, passages[i].id, "sample"), i))
        kept = set(drawn[:sample])
        passages = [p for i, p in enumerate(passages) if i in kept]
    return passages


@dataclass
class _Slot:
    passage: Passage
    index: int
    task_type: str
    task: str


def _plan_slots(passage: Passage, config: GenerateConfig) -> list[_Slot]:
    """Each slot of a passage draws a task type no other slot of it has (until all are used), so
    several queries per passage differ in kind, not only in sampling."""
    rng = random.Random(derive_seed(config.seed, passage.id, "plan"))
    slots: list[_Slot] = []
    for index in range(config.per_passage):
        used = {s.task_type for s in slots[index - index % len(config.task_types):]}  # this round's
        task_type = rng.choice([t for t in config.task_types if t not in used])
        slots.append(_Slot(passage, index, task_type, rng.choice(TASK_TYPES[task_type].descriptions)))
    return slots


def generate_batch(passages: list[Passage], llm: LLM, config: GenerateConfig) -> dict[str, dict]:
    """Run every slot of these passages through attempts; returns a journal entry per passage.

    Engines call this per batch (`generate_locally` here, `gecko.scale` in Ray actors), so the
    output does not depend on where a batch ran."""
    prompt_id, render = GENERATE_PROMPTS[config.prompt_style]
    examples = few_shot_queries()
    entries = {p.id: {"records": [], "rejected": Counter()} for p in passages}
    pending = [slot for p in passages for slot in _plan_slots(p, config)]
    attempt = 0
    while pending:
        # every slot in a round is on the same attempt, so one batched call per round; the
        # backend derives each prompt's random stream from (seed, prompt)
        seed = derive_seed(config.seed, "attempt", attempt)
        prompts = [render(" ".join(s.passage.text.split()[: config.max_passage_words]), s.task_type) for s in pending]
        params = GenerationParams(config.max_tokens, config.temperature, config.top_p, ("\n",), seed)
        raws = llm.generate(prompts, params)
        if len(raws) != len(prompts):  # zip would drop or invent slots without a word
            raise LLMError(f"{llm.identity}: {len(raws)} answers to {len(prompts)} prompts")
        retry = []
        for slot, raw in zip(pending, raws):
            entry = entries[slot.passage.id]
            query, reason = (parse_query(raw, slot.task_type, slot.passage, examples) if isinstance(raw, str)
                             else (None, "not text"))
            if query is not None and any(_overlap(words(query), words(r["query"])) >= 0.8 for r in entry["records"]):
                query, reason = None, "duplicate"
            if query is None:
                entry["rejected"][reason] += 1
                if attempt + 1 < config.max_attempts:
                    retry.append(slot)
                continue
            record = GeneratedQuery(
                id=f"{slot.passage.id}:q{slot.index}", seed_id=slot.passage.id, task_type=slot.task_type,
                task=slot.task, query=query, prompt_id=prompt_id, model=llm.identity, temperature=config.temperature,
                top_p=config.top_p, max_tokens=config.max_tokens, sampling_seed=seed, attempt=attempt, raw=raw)
            entry["records"].append(asdict(record))
        pending = retry
        attempt += 1
    for entry in entries.values():
        entry["records"].sort(key=lambda r: r["id"])
        entry["rejected"] = dict(entry["rejected"])
    return entries


def config_key(config: GenerateConfig, llm: LLM) -> str:
    """What a passage's journaled queries depend on: every setting (batches included: llama.cpp's
    sampled tokens depend slightly on a batch's other prompts) and the LLM."""
    parts = {"config": asdict(config), "llm": getattr(llm, "identity", "?")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=list).encode()).hexdigest()[:16]


def generate_locally(passages: list[Passage], llm: LLM, config: GenerateConfig) -> Iterator[dict[str, dict]]:
    """The local engine: `generate_batch` over consecutive batches of `config.batch_size` passages."""
    for start in range(0, len(passages), config.batch_size):
        yield generate_batch(passages[start : start + config.batch_size], llm, config)


def run_generate(corpus: str | Path, out: str | Path, llm: LLM, config: GenerateConfig = GenerateConfig(),
                 limit: int | None = None, lenient: bool = False, progress: bool = True, *, sample: int | None = None,
                 engine: Callable[[list[Passage], LLM, GenerateConfig], Iterable[dict[str, dict]]] = generate_locally,
                 write: Callable[[Path, list[dict]], object] = write_jsonl_atomic) -> GenerateSummary:
    """Generate queries for a corpus into `out` (JSONL); resumable via `out`.journal.

    `limit` and `sample` choose the passages (`select_passages`);
    `engine` yields journal entries batch by batch (`gecko.scale` runs the batches on Ray);
    `write` writes the final records (`gecko.scale` writes shards and a manifest)."""
    started = time.perf_counter()
    out = Path(out)
    passages, _ = load_corpus(corpus, lenient=lenient)  # validates everything before any write
    corpus_passages = len(passages)
    passages = select_passages(passages, limit, sample, config.seed)
    adapted = getattr(llm, "chat", False) is True and config.prompt_style != "chat"
    if adapted:  # a few-shot completion prompt means nothing to a chat endpoint
        config = replace(config, prompt_style="chat")
    journal = Journal(out.with_name(out.name + ".journal"))
    key = config_key(config, llm)  # entries of a run with other settings are redone, not reused
    meter = UsageMeter(llm)
    done = {e["key"] for e in journal.entries() if e.get("config_key") == key}
    todo = [p for p in passages if p.id not in done]
    bar = tqdm(total=len(passages), initial=len(passages) - len(todo), unit="passage", disable=not progress)
    try:
        for entries in engine(todo, llm, config):
            for pid, entry in entries.items():
                journal.add(pid, {**entry, "config_key": key})
            bar.update(len(entries))
    except BudgetExceeded as err:
        raise BudgetExceeded(f"generate stopped: {err}; {len(journal)} of {len(passages)} passages are journaled in "
                             f"{journal.path}: rerun with a higher max_cost to go on (cached calls cost nothing)") from None
    finally:
        bar.close()
        journal.close()

    wanted = {p.id for p in passages}
    summary = GenerateSummary(passages=len(passages), corpus_passages=corpus_passages)
    records = []
    for entry in journal.entries():
        if entry["key"] not in wanted or entry.get("config_key") != key:
            continue
        summary.rejected.update(entry["rejected"])
        summary.passages_with_query += bool(entry["records"])
        records.extend(entry["records"])
    by_order = {p.id: i for i, p in enumerate(passages)}
    records.sort(key=lambda r: (by_order[r["seed_id"]], r["id"]))
    write(out, records)
    summary.accepted = len(records)
    summary.task_mix.update(r["task_type"] for r in records)
    summary.mean_query_words = sum(len(words(r["query"])) for r in records) / max(len(records), 1)
    usage = meter.used()
    summary.llm_calls, summary.llm_cache_hits = usage.calls, usage.cache_hits
    summary.tokens_in, summary.tokens_out, summary.cost = usage.tokens_in, usage.tokens_out, usage.cost
    summary.prompt_style = config.prompt_style if adapted else None
    summary.wall_s = time.perf_counter() - started
    write_json_atomic(out.with_name(out.name + ".summary.json"), summary.to_dict())
    return summary
