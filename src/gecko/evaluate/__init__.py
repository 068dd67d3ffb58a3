"""MTEB-style evaluation of an embedder on local data, at every Matryoshka dimension.

    from gecko.evaluate import evaluate
    results = evaluate("default", ["scifact=../shared/data/scifact", "stsb=../shared/data/stsb"],
                       dims=[384, 256, 128, 64], prompts=False)
    results.write("runs/eval")          # results.json, results.md, score_vs_dim.png, mteb/dim*/...
    print(results.table())

Tasks: `RetrievalTask`, `STSTask`, `ClassificationTask` (declarative dataclasses, each type bringing
its loading and scoring); `KNOWN_TASKS`
maps scifact, stsb, sts12..sts16 and banking77 to their type, split, MTEB name and prompt, and any
other `NAME=PATH` is typed by sniffing its folder (or `NAME:TYPE=PATH`).
"""

from gecko.evaluate.core import BACKENDS, evaluate, load_baseline
from gecko.evaluate.report import Results, TaskScores, load_results, markdown_table, write_report
from gecko.evaluate.tasks import (
    KNOWN_TASKS, TASK_TYPES, ClassificationTask, EvalError, RetrievalTask, STSTask, Task, load_task_data,
    parse_task_spec, resolve_task
)

__all__ = [
    "BACKENDS", "KNOWN_TASKS", "TASK_TYPES", "ClassificationTask", "EvalError", "Results", "RetrievalTask", "STSTask",
    "Task", "TaskScores", "evaluate", "load_baseline", "load_results", "load_task_data", "markdown_table",
    "parse_task_spec", "resolve_task", "write_report"
]
