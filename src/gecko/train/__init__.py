"""`gecko train`: contrastive fine-tuning with in-batch, hard and same-tower negatives and Matryoshka dims.

    from gecko.train import TrainConfig, DataSpec, train
    path = train(TrainConfig(
        data=[DataSpec("runs/relabelled.jsonl"), DataSpec("../shared/data/stsb", weight=0.5),
              DataSpec("../shared/data/banking77", limit=2000)],
        out="runs/gecko-minilm", steps=500, batch_size=32))
    # SentenceTransformer(path).encode_query([...]) applies `task: search result | query: `

Modules: `config` (TrainConfig, DataSpec, StageConfig), `data` (sources -> formatted examples,
weighted mixture), `loss` (GeckoLoss / GeckoCachedLoss on sentence-transformers' MNRL), `run`
(the Trainer run, checkpoints and resume, saving), `card` (model card and loss plot).
"""

from gecko.formats import format_document, format_query
from gecko.train.config import DataSpec, StageConfig, TrainConfig
from gecko.train.data import (
    Example,
    Mixture,
    SourceData,
    TrainDataError,
    build_mixture,
    classification_triples,
    load_source,
    to_columns,
)
from gecko.train.run import TrainError, complete_checkpoints, default_dims, saved_prompts, train

_LOSS = ("GeckoCachedLoss", "GeckoLoss", "bucketed_embed", "gecko_row_losses")


def __getattr__(name: str):
    """The losses import torch and sentence-transformers: loaded when first used, so the CLI starts fast."""
    if name in _LOSS:
        from gecko.train import loss

        return getattr(loss, name)
    raise AttributeError(f"module 'gecko.train' has no attribute {name!r}")

__all__ = [
    "DataSpec",
    "Example",
    "GeckoCachedLoss",
    "GeckoLoss",
    "Mixture",
    "SourceData",
    "StageConfig",
    "TrainConfig",
    "TrainDataError",
    "TrainError",
    "bucketed_embed",
    "build_mixture",
    "classification_triples",
    "complete_checkpoints",
    "default_dims",
    "format_document",
    "format_query",
    "gecko_row_losses",
    "load_source",
    "saved_prompts",
    "to_columns",
    "train",
]
