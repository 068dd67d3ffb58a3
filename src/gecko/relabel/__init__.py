"""FRet step 2: retrieve candidates for each generated query, let the LLM re-rank them (QL and
RC fused by RRF), and keep the top one as the positive and a low-ranked one as hard negative."""

from gecko.relabel.fusion import FUSIONS, NEGATIVE_METHODS, fuse, parse_weights, ranks, select_negatives
from gecko.relabel.rerank_eval import RerankEvalResult, run_rerank_eval
from gecko.relabel.run import (
    Candidate, GeneratedRecord, RelabelConfig, RelabelError, RelabelExample, RelabelSummary, build_example, is_easy, is_lost,
    load_generated, run_relabel
)
from gecko.relabel.scoring import InvalidScore, PairScore, PairScorer, ScoreConfig, naive_score, passage_for_llm

__all__ = [
    "FUSIONS", "InvalidScore", "NEGATIVE_METHODS", "PairScore", "PairScorer", "RerankEvalResult", "ScoreConfig", "fuse",
    "naive_score", "parse_weights", "passage_for_llm", "ranks", "run_rerank_eval", "select_negatives", "Candidate",
    "GeneratedRecord", "RelabelConfig", "RelabelError", "RelabelExample", "RelabelSummary", "build_example", "is_easy", "is_lost",
    "load_generated", "run_relabel"
]
