"""The Gecko loss, built on sentence-transformers' MultipleNegativesRankingLoss.

For query q_i with positive p_i, hard negative(s) p_i^- and a batch of B examples,

    loss_i = -log  exp(s(q_i, p_i)/t) / Z_i
    Z_i    = sum_j exp(s(q_i, p_j)/t)            in-batch positives (j = i included)
           + sum_k exp(s(q_i, p_ik^-)/t)         the query's own hard negative(s)
           + sum_{j != i} exp(s(q_i, q_j)/t)     same-tower negatives: the other queries

with s the cosine similarity and t the temperature (the paper's equation; sentence-transformers
calls 1/t the `scale`). This is `MultipleNegativesRankingLoss(directions=("query_to_doc",
"query_to_query"), partition_mode="joint")` except in three things sentence-transformers lacks,
which are all this module adds:

* `hard_negatives="own"` keeps only each query's own hard negatives in its denominator, as the
  paper writes it; sentence-transformers puts every row's negatives in every denominator
  (`hard_negatives="batch"` here, which gives exactly its loss: a test checks this).
* Rows may have fewer negatives than the batch has negative columns (pairs mixed with triples in
  one batch): the `label` column carries each row's count of real negatives and the padding is
  masked out of the softmax (and never embedded).
* `bucketed=True` embeds all texts of a batch (queries, positives, negatives) sorted by length in
  chunks cut to their own longest text, instead of one forward per column padded to the column's
  longest text (what sentence-transformers does). Same embeddings up to float rounding, less
  padding: the speed-up measured in benchmarks/RESULTS.md.

Wrap it in `MatryoshkaLoss` for several dims (its forward cache replays our chunked forwards in
order). `GeckoCachedLoss` is the GradCache variant (CachedMultipleNegativesRankingLoss with the same
scoring) for batches larger than memory allows; `CachedListwiseDistillLoss` the same for the listwise
term.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.util import all_gather, all_gather_with_grad, get_rank, get_world_size

HardNegatives = Literal["own", "batch", "none"]
HARD_NEGATIVE_MODES = ("own", "batch", "none")


def gecko_row_losses(
    queries: Tensor,
    docs: list[Tensor],
    *,
    scale: float,
    same_tower: bool = True,
    hard_negatives: HardNegatives = "own",
    counts: Tensor | None = None,
    rows: Tensor | None = None,
    negatives_gathered: bool = False,
) -> Tensor:
    """Per-row losses for the query rows `rows` (default: all) of a batch.

    `queries` (N, d) and `docs[0]` (N, d) hold every query and positive the rows compete with (N is
    the batch, or the global batch when gathered across devices); `docs[1:]` are the negative
    columns, (N, d) when `negatives_gathered` else (len(rows), d) for the local rows only. `counts`
    (N,) or (len(rows),) likewise: how many negative columns of each row are real (None: all).
    Similarities are cosines; embeddings need not be normalised.
    """
    device = queries.device
    n_all = queries.size(0)
    if rows is None:
        rows = torch.arange(n_all, device=device)
    q_all = F.normalize(queries, dim=-1)
    q = q_all[rows]
    positives = F.normalize(docs[0], dim=-1)
    blocks = [q @ positives.T]  # (n, N): the target is column `rows[r]`
    negatives = [F.normalize(d, dim=-1) for d in docs[1:]]
    if negatives and hard_negatives != "none":
        k = len(negatives)
        if hard_negatives == "own":
            own = torch.stack([neg[rows] if negatives_gathered else neg for neg in negatives], dim=1)  # (n, k, d)
            scores = torch.einsum("nd,nkd->nk", q, own)
            if counts is not None:
                row_counts = counts[rows] if negatives_gathered else counts
                valid = torch.arange(k, device=device)[None, :] < row_counts[:, None]
                scores = scores.masked_fill(~valid, float("-inf"))
            blocks.append(scores)
        elif hard_negatives == "batch":
            if not negatives_gathered and n_all != q.size(0):
                raise ValueError("hard_negatives='batch' across devices needs the negatives gathered too")
            scores = q @ torch.cat(negatives, dim=0).T  # (n, k*N), column-major: negative column c, row j
            if counts is not None:
                valid = (torch.arange(k, device=device)[:, None] < counts[None, :]).reshape(1, -1)
                scores = scores.masked_fill(~valid, float("-inf"))
            blocks.append(scores)
        else:
            raise ValueError(f"hard_negatives must be one of {HARD_NEGATIVE_MODES}, got {hard_negatives!r}")
    if same_tower:
        same = q @ q_all.T
        same[torch.arange(len(rows), device=device), rows] = float("-inf")  # not itself
        blocks.append(same)
    logits = torch.cat(blocks, dim=1) * scale
    return torch.logsumexp(logits, dim=1) - logits[torch.arange(len(rows), device=device), rows]


def bucketed_embed(model: nn.Module, features_list: list[dict[str, Any]], *, chunk_rows: int | None = None,
                   skip: Tensor | None = None) -> list[Tensor] | None:
    """Embed every column's rows sorted by length, `chunk_rows` at a time, each chunk cut to its
    longest text. Returns one (rows, d) tensor per column, or None when the features are not plain
    right-padded token batches (the caller then uses sentence-transformers' per-column forwards).

    `skip` (columns, rows) bool marks rows not to embed (padding negatives); they come back as zeros.
    """
    if not features_list:
        return []
    keys = set(features_list[0])
    if "attention_mask" not in keys or "input_ids" not in keys or any(set(f) != keys for f in features_list):
        return None
    rows = features_list[0]["input_ids"].shape[0]
    tensor_keys = {key for key, value in features_list[0].items() if isinstance(value, Tensor)}
    constants = {key: value for key, value in features_list[0].items() if key not in tensor_keys}  # e.g. modality="text"
    for features in features_list:
        for key, value in features.items():
            if key in tensor_keys:
                if not isinstance(value, Tensor) or value.ndim != 2 or value.shape[0] != rows:
                    return None
            elif isinstance(value, Tensor) or value != constants[key]:
                return None
        mask = features["attention_mask"]
        # right padding: each row's real tokens come first (what the trim below relies on)
        lengths = mask.sum(dim=1)
        if mask.shape[1] and not bool((mask.cumsum(dim=1)[torch.arange(rows), (lengths - 1).clamp(min=0)] == lengths).all()):
            return None
    columns = len(features_list)
    width = max(f["input_ids"].shape[1] for f in features_list)
    flat = {
        key: torch.cat([F.pad(f[key], (0, width - f[key].shape[1])) for f in features_list], dim=0) for key in tensor_keys
    }
    lengths = flat["attention_mask"].sum(dim=1)
    wanted = torch.arange(columns * rows, device=lengths.device)
    if skip is not None:
        wanted = wanted[~skip.reshape(-1).to(lengths.device)]
    order = wanted[torch.argsort(lengths[wanted], descending=True, stable=True)]
    chunk = chunk_rows or rows
    pieces = []
    for start in range(0, len(order), chunk):
        index = order[start : start + chunk]
        cut = max(int(lengths[index].max()), 1)
        chunk_features = {key: value[index, :cut] for key, value in flat.items()}
        pieces.append(model({**chunk_features, **constants})["sentence_embedding"])
    if not pieces:
        return None
    embedded = torch.cat(pieces, dim=0)
    out = embedded.new_zeros((columns * rows, embedded.shape[1]))
    out = out.index_copy(0, order, embedded)
    return list(out.reshape(columns, rows, -1).unbind(0))


def _directions(temperature: float, same_tower: bool, hard_negatives: str) -> tuple[str, ...]:
    """Validate the shared settings; MNRL's directions: query-to-query adds the same-tower negatives."""
    if not temperature > 0:
        raise ValueError("temperature must be positive")
    if hard_negatives not in HARD_NEGATIVE_MODES:
        raise ValueError(f"hard_negatives must be one of {HARD_NEGATIVE_MODES}, got {hard_negatives!r}")
    return ("query_to_doc", "query_to_query") if same_tower else ("query_to_doc",)


class GeckoLoss(MultipleNegativesRankingLoss):
    """Softmax cross-entropy over in-batch positives, own hard negatives and same-tower negatives.

    Args:
        model: the SentenceTransformer being trained.
        temperature: t in exp(cos/t) (0.05 = sentence-transformers' default scale 20).
        same_tower: put the batch's other queries in each denominator (the paper's same-tower negatives).
        hard_negatives: "own" (the paper), "batch" (every row's negatives, as sentence-transformers) or
            "none" (ignore negative columns: in-batch negatives only, as in pre-finetuning).
        negatives_in_label: the `label` column counts each row's real negatives (padding masked).
        gather_across_devices: under DDP, compete with the queries and positives of every device
            (and with their negatives when hard_negatives="batch").
        bucketed: length-sorted chunked forward (see module docstring); falls back automatically.
        chunk_rows: rows per forward chunk when bucketed (default: the batch size).
    """

    def __init__(
        self,
        model,
        temperature: float = 0.05,
        same_tower: bool = True,
        hard_negatives: HardNegatives = "own",
        negatives_in_label: bool = False,
        gather_across_devices: bool = False,
        bucketed: bool = True,
        chunk_rows: int | None = None,
    ) -> None:
        directions = _directions(temperature, same_tower, hard_negatives)
        super().__init__(model, scale=1.0 / temperature, gather_across_devices=gather_across_devices,
                         directions=directions, partition_mode="joint")
        self.same_tower = same_tower
        self.hard_negatives = hard_negatives
        self.negatives_in_label = negatives_in_label
        self.bucketed = bucketed
        self.chunk_rows = chunk_rows

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        features = list(sentence_features)
        if self.hard_negatives == "none":
            features = features[:2]
        counts = labels if (self.negatives_in_label and labels is not None and len(features) > 2) else None
        skip = None
        if counts is not None:
            skip = torch.zeros(len(features), counts.shape[0], dtype=torch.bool, device=counts.device)
            for c in range(2, len(features)):
                skip[c] = counts <= c - 2
        return self.compute_loss_from_embeddings(self.embed(features, skip), counts)

    def embed(self, features: list[dict[str, Tensor]], skip: Tensor | None = None) -> list[Tensor]:
        """One (rows, d) tensor per column; rows marked in `skip` (columns, rows) are not embedded
        when bucketed (they come back as zeros)."""
        embeddings = bucketed_embed(self.model, features, chunk_rows=self.chunk_rows, skip=skip) if self.bucketed else None
        return embeddings if embeddings is not None else embed_columns(self.model, features)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        queries, docs = embeddings[0], list(embeddings[1:])
        counts = labels if (labels is not None and len(docs) > 1) else None
        batch = queries.size(0)
        rows = torch.arange(batch, device=queries.device)
        gathered_negatives = False
        if self.gather_across_devices and get_world_size() > 1:
            offset = get_rank() * batch
            rows = rows + offset
            queries = all_gather_with_grad(queries)
            docs[0] = all_gather_with_grad(docs[0])
            if self.hard_negatives == "batch" and len(docs) > 1:
                docs[1:] = [all_gather_with_grad(d) for d in docs[1:]]
                counts = all_gather(counts) if counts is not None else None
                gathered_negatives = True
        else:
            gathered_negatives = True  # local batch: negatives are indexed like the queries
        losses = gecko_row_losses(
            queries, docs, scale=self.scale, same_tower=self.same_tower, hard_negatives=self.hard_negatives,
            counts=counts, rows=rows, negatives_gathered=gathered_negatives,
        )
        return losses.mean()

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "scale": self.scale,
            "same_tower": self.same_tower,
            "hard_negatives": self.hard_negatives,
            "negatives_in_label": self.negatives_in_label,
            "gather_across_devices": self.gather_across_devices,
            "bucketed": self.bucketed,
        }


def listwise_kl(queries: Tensor, columns: list[Tensor], teacher: Tensor, *, scale: float, teacher_temperature: float) -> Tensor:
    """mean over rows with 2+ scored texts of KL(softmax(teacher / t_r) || softmax(scale * cos)) over
    those texts (`ListwiseDistillLoss`'s term; NaN teacher scores mark texts outside a row's list)."""
    docs = torch.stack([F.normalize(c, dim=-1) for c in columns], dim=1)  # (B, L, d)
    student = torch.einsum("bd,bld->bl", F.normalize(queries, dim=-1), docs) * scale
    valid = ~torch.isnan(teacher)
    rows = valid.sum(dim=1) >= 2
    if not bool(rows.any()):
        return student.sum() * 0.0
    student, teacher, valid = student[rows], teacher[rows], valid[rows]
    target = F.softmax((teacher / teacher_temperature).masked_fill(~valid, float("-inf")), dim=1)
    log_q = F.log_softmax(student.masked_fill(~valid, float("-inf")), dim=1)
    terms = torch.where(valid, target * (torch.log(target.clamp_min(1e-30)) - log_q), torch.zeros_like(target))
    return terms.sum(dim=1).mean()


class ListwiseDistillLoss(nn.Module):
    """The Gecko loss plus a listwise distillation term from the LLM's scores of a query's candidates.

    For query q_i with list C_i = [p_i, p_i^-..., c_i1 ...] (positive, hard negatives, extra
    candidates of its relabeled top N) and teacher scores r_ij (QL plus the base retriever's scaled
    cosine by default, QL per query token, summed QL, fused rank score, ...:
    `TrainConfig.distill_teacher`), with t_s the Gecko temperature and t_r the teacher's:

        P_ij = softmax_j(r_ij / t_r)                    the teacher's distribution over C_i
        Q_ij = softmax_j(cos(q_i, c_ij) / t_s)          the student's
        loss = gecko_loss + weight * mean_i KL(P_i || Q_i)

    as in RocketQAv2 / reader-to-retriever distillation: the contrastive term keeps the recipe's
    top-1 labels, the KL term teaches the order of the rest, which the recipe otherwise throws
    away. No extra LLM call: relabel already scored every candidate. `labels` rows are
    [negative count, r of the positive, of each negative column, of each candidate column], NaN
    where there is no score (padding; rows of sources without candidates have no KL term);
    texts with NaN scores in candidate columns are not embedded.
    """

    def __init__(self, model, inner: GeckoLoss, *, weight: float = 1.0, teacher_temperature: float = 1.0, negatives: int = 0):
        super().__init__()
        if not teacher_temperature > 0:
            raise ValueError("teacher_temperature must be positive")
        self.model = model
        self.inner = inner
        self.weight = weight
        self.teacher_temperature = teacher_temperature
        self.negatives = negatives  # negative columns before the candidate columns

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        features = list(sentence_features)
        counts, teacher = labels[:, 0].long(), labels[:, 1:].float()
        k = self.negatives
        skip = torch.zeros(len(features), labels.shape[0], dtype=torch.bool, device=labels.device)
        for c in range(2, 2 + k):
            skip[c] = counts <= c - 2
        for c in range(2 + k, len(features)):
            skip[c] = torch.isnan(teacher[:, c - 1])
        embeddings = self.inner.embed(features, skip)
        contrastive_cols = embeddings[:2] if self.inner.hard_negatives == "none" else embeddings[: 2 + k]
        contrastive = self.inner.compute_loss_from_embeddings(contrastive_cols, counts if k else None)
        return contrastive + self.weight * self.kl(embeddings[0], embeddings[1:], teacher)

    def kl(self, queries: Tensor, columns: list[Tensor], teacher: Tensor) -> Tensor:
        return listwise_kl(queries, columns, teacher, scale=self.inner.scale, teacher_temperature=self.teacher_temperature)

    def get_config_dict(self) -> dict[str, Any]:
        return {**self.inner.get_config_dict(), "distill_weight": self.weight,
                "teacher_temperature": self.teacher_temperature}


class GeckoCachedLoss(CachedMultipleNegativesRankingLoss):
    """GradCache version of `GeckoLoss`: embeddings in mini-batches without graphs, loss, then
    gradients replayed mini-batch by mini-batch, so the batch size is bounded by time, not memory."""

    def __init__(
        self,
        model,
        temperature: float = 0.05,
        same_tower: bool = True,
        hard_negatives: HardNegatives = "own",
        negatives_in_label: bool = False,
        gather_across_devices: bool = False,
        mini_batch_size: int = 32,
    ) -> None:
        directions = _directions(temperature, same_tower, hard_negatives)
        super().__init__(model, scale=1.0 / temperature, mini_batch_size=mini_batch_size,
                         gather_across_devices=gather_across_devices, directions=directions, partition_mode="joint")
        object.__setattr__(self, "same_tower", same_tower)
        object.__setattr__(self, "hard_negatives", hard_negatives)
        object.__setattr__(self, "negatives_in_label", negatives_in_label)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        features = list(sentence_features)
        if self.hard_negatives == "none":
            features = features[:2]
        return super().forward(features, labels)

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False) -> Tensor:
        queries = torch.cat(reps[0])
        docs = [torch.cat(r) for r in reps[1:]]
        counts = labels if (self.negatives_in_label and labels is not None and len(docs) > 1) else None
        batch = queries.size(0)
        offset = 0
        gathered_negatives = True
        if self.gather_across_devices and get_world_size() > 1:
            offset = get_rank() * batch
            queries = all_gather_with_grad(queries)
            docs[0] = all_gather_with_grad(docs[0])
            if self.hard_negatives == "batch" and len(docs) > 1:
                docs[1:] = [all_gather_with_grad(d) for d in docs[1:]]
                counts = all_gather(counts) if counts is not None else None
            else:
                gathered_negatives = False
        losses = []
        for begin in range(0, batch, self.mini_batch_size):
            end = min(begin + self.mini_batch_size, batch)
            rows = torch.arange(offset + begin, offset + end, device=queries.device)
            if gathered_negatives:
                part_docs, part_counts = docs, counts
            else:
                part_docs = [docs[0], *[d[begin:end] for d in docs[1:]]]
                part_counts = counts[begin:end] if counts is not None else None
            row_losses = gecko_row_losses(
                queries, part_docs, scale=self.scale, same_tower=self.same_tower, hard_negatives=self.hard_negatives,
                counts=part_counts, rows=rows, negatives_gathered=gathered_negatives,
            )
            loss = row_losses.sum() / batch
            if with_backward:
                loss.backward()
                loss = loss.detach()
            losses.append(loss)
        return sum(losses)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "scale": self.scale,
            "same_tower": self.same_tower,
            "hard_negatives": self.hard_negatives,
            "negatives_in_label": self.negatives_in_label,
            "gather_across_devices": self.gather_across_devices,
            "mini_batch_size": self.mini_batch_size,
        }


class CachedListwiseDistillLoss(GeckoCachedLoss):
    """`ListwiseDistillLoss` under GradCache: every column, candidates included, embedded in
    mini-batches without graphs; the Gecko loss and the KL term on those embeddings; gradients
    replayed mini-batch by mini-batch. Memory is bounded by `mini_batch_size` rather than by
    batch x list length (the plain variant keeps the graphs of all batch x (list + 1) texts).
    Padding texts are embedded here (and masked by their NaN scores), not skipped."""

    def __init__(self, model, *, weight: float = 1.0, teacher_temperature: float = 1.0, negatives: int = 0, **gecko):
        if not teacher_temperature > 0:
            raise ValueError("teacher_temperature must be positive")
        super().__init__(model, **gecko)
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "teacher_temperature", teacher_temperature)
        object.__setattr__(self, "negatives", negatives)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        return self.forward_cached(list(sentence_features), labels)  # every column: the KL term reads them all

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False) -> Tensor:
        counts, teacher = labels[:, 0].long(), labels[:, 1:].float()
        contrastive_cols = reps[:2] if self.hard_negatives == "none" else reps[: 2 + self.negatives]
        contrastive = super().calculate_loss(contrastive_cols, counts, with_backward=with_backward)
        embeddings = [torch.cat(r) for r in reps]
        kl = self.weight * listwise_kl(embeddings[0], embeddings[1:], teacher, scale=self.scale,
                                       teacher_temperature=self.teacher_temperature)
        if with_backward:
            kl.backward()
            kl = kl.detach()
        return contrastive + kl

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "distill_weight": self.weight, "teacher_temperature": self.teacher_temperature}
