"""`gecko run`: the whole recipe (generate → relabel → train → eval) from one YAML config.

    from gecko.pipeline import load_config, run_pipeline
    result = run_pipeline(load_config("configs/scifact.yaml", ["relabel.top_n=10"]))
    print(result.table())        # before / after at every Matryoshka dim; result.report: report.md

Modules: `config` (the typed config, overrides, validation), `run` (stages, manifests, skip and
resume), `report` (report.md and its plots).
"""

from gecko.pipeline.config import (
    ConfigError, EvalStage, EvalTask, GenerateStage, PipelineConfig, RelabelStage, TrainStage, load_config
)
from gecko.pipeline.report import before_after_rows, before_after_table
from gecko.pipeline.run import STAGES, PipelineError, RunResult, StageRun, read_manifest, run_pipeline, start_in_background

__all__ = [
    "ConfigError", "EvalStage", "EvalTask", "GenerateStage", "PipelineConfig", "PipelineError", "RelabelStage",
    "RunResult", "STAGES", "StageRun", "TrainStage", "before_after_rows", "before_after_table", "load_config",
    "read_manifest", "run_pipeline", "start_in_background"
]
