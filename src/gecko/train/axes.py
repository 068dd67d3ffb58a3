"""Order a trained model's coordinates by the corpus's principal axes, so truncation keeps the most.

Matryoshka training asks the first d coordinates to work alone, but the trained model still
spreads the corpus's variance over all of them. The rotation R whose columns are the eigenvectors
of E^T E (E: the model's unit embeddings of the corpus's documents, uncentred, by descending
eigenvalue) changes no full-dimension cosine (R is orthogonal), and makes the first d coordinates
of every document the best rank-d approximation of the documents in least squares (Eckart-Young).
It needs no labels, only the documents the student will search, and is stored in the model as a
bias-free linear layer after the last one, so any sentence-transformers user gets it.

Measured (benchmarks/RESULTS.md, "The corpus's principal axes"): on SciFact test, `gecko train`'s
default student at 128 dims 61.37 -> 65.72, at 64 dims 53.12 -> 60.28, unchanged at 384 (chosen on
SciFact dev: +3.56 at 128); other tasks' small dims move by -1.8 to +1.5 at 128.
"""

from __future__ import annotations

import random

import numpy as np

from gecko.formats import TextFormat


def principal_axes(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R, share): R's columns the uncentred principal axes of the L2-normalised rows, by variance;
    share[d-1] the fraction of the rows' squared norm their first d rotated coordinates keep."""
    emb = np.asarray(embeddings, dtype=np.float64)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    values, vectors = np.linalg.eigh(emb.T @ emb)
    order = np.argsort(values)[::-1]
    values = np.clip(values[order], 0, None)
    return vectors[:, order], np.cumsum(values) / values.sum()


def seeded_sample(items: list, limit: int, seed: int) -> list:
    """All of `items`, or a seeded sample of `limit` of them when there are more."""
    return items if len(items) <= limit else random.Random(seed).sample(items, limit)


def corpus_documents(passages: list, limit: int, seed: int, fmt: TextFormat = TextFormat()) -> list[str]:
    """The documents the axes are fitted on: a seeded sample of the corpus's passages (anything
    with `title` and `text`), formatted as the model embeds documents."""
    return [fmt.document(p.text, p.title) for p in seeded_sample(passages, limit, seed)]


def rotate_onto_principal_axes(model, documents: list[str], dims: list[int], *, batch_size: int = 32) -> dict:
    """Embed `documents` (formatted as the model will see them) and append the rotation onto
    their principal axes to `model`, folded into a rotation gecko added before; returns the
    summary the model card and training.json keep."""
    import torch

    from sentence_transformers.base.modules.dense import Dense

    if not documents:
        raise ValueError("no documents to fit the principal axes on")
    emb = model.encode(documents, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    axes, share = principal_axes(emb)
    weight = torch.tensor(axes.T, dtype=torch.float32)
    last = model[-1]
    if _is_rotation(last):  # fold: one layer however often a model is retrained
        with torch.no_grad():
            last.linear.weight.copy_(weight.to(last.linear.weight) @ last.linear.weight)
    else:
        full = weight.shape[0]
        model.append(Dense(full, full, bias=False, activation_function=None, init_weight=weight).to(model.device))
    return {"documents": len(documents), "kept_share": {str(d): round(float(share[d - 1]), 4) for d in dims}}


def _is_rotation(module) -> bool:
    """A square, bias-free, activation-free Dense: the layer this module appends."""
    import torch

    linear = getattr(module, "linear", None)
    return (type(module).__name__ == "Dense" and linear is not None and linear.bias is None
            and linear.in_features == linear.out_features and isinstance(module.activation_function, torch.nn.Identity))
