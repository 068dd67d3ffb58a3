"""Sampling the next token from full-vocabulary logits, shared by the in-process backends.

Nucleus sampling needs the smallest set of most likely tokens whose mass reaches top_p. A full
sort of a 262k-token row took ~10 ms (as long as the model's forward for that token on this
CPU); the nucleus nearly always lies in the top few hundred, so those are found with `topk` and
the full sort is done only for a row whose top ones fall short of top_p. The result is the same.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

TOP_K_FIRST = 512  # candidates tried before falling back to a full sort


def prompt_seed(seed: int, prompt: str) -> int:
    """A per-prompt random stream: a prompt's sample does not depend on its batch neighbours."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt}".encode()).digest()[:8], "big")


def _nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, probabilities) of the nucleus of one probability row, most likely first."""
    k = min(TOP_K_FIRST, probs.numel())
    values, ids = probs.topk(k)
    if float(values.sum()) < top_p and k < probs.numel():
        values, ids = probs.sort(descending=True)
    keep = int(torch.searchsorted(values.cumsum(0), torch.tensor(top_p, dtype=values.dtype))) + 1
    return ids[:keep], values[:keep]


def sample_rows(logits: torch.Tensor, temperature: float, top_p: float, rngs: Sequence[np.random.Generator]) -> list[int]:
    """One token per row of [rows, vocab] logits: greedy at temperature 0, else nucleus sampling
    from softmax(logits / temperature), row i drawing from rngs[i]."""
    if temperature <= 0:
        return logits.argmax(dim=-1).tolist()
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    out = []
    for row, rng in zip(probs, rngs):
        if top_p < 1.0:
            ids, p = _nucleus(row, top_p)
        else:
            ids, p = torch.arange(row.numel()), row
        p = p.double().numpy()
        out.append(int(ids[int(rng.choice(len(p), p=p / p.sum()))]))
    return out
