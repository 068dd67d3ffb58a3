"""Batched decoder passes after a shared, cached prefix: the transformers backend's engine.

Gecko's LLM work is many short texts after one long shared text: the few-shot block, then a
passage, then each query. In `SlotKV` a token's keys and values sit in the slot numbered by
its position, so the rows of a batch can start from a copy of one prefix's entries and each
write its own tokens at its own positions; the masks follow from the positions alone (causal,
plus the sliding window on local layers), so right-padding needs no mask of its own: no real
token ever sees a later slot. The model's own modules do everything else: its attention calls
`cache.update`, and a dict of masks by layer type goes in as `attention_mask`, as `generate`
passes them. Grouped-query attention runs as one SDPA call per key/value head with the query
heads of the group stacked, instead of copying the keys once per query head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION = "gecko_slots"


def grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA for [B, H, S, D] queries over [B, Hkv, L, D] keys, heads of a group stacked as rows."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    q = query.reshape(batch, kv_heads, group * length, dim)
    if attention_mask is None:  # a plain forward that sdpa's mask builder left causal
        out = F.scaled_dot_product_attention(query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1), is_causal=length > 1, scale=scaling)
        return out.transpose(1, 2), None
    if attention_mask.dtype != torch.bool:  # an additive float mask from sdpa's builder
        attention_mask = attention_mask == 0
    mask = attention_mask.expand(batch, group, length, key.shape[2]).reshape(batch, 1, group * length, key.shape[2])
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, length, dim).transpose(1, 2), None


def register_attention() -> None:
    """Make ATTENTION an attention implementation; plain forwards get sdpa's masks with it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, grouped_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


class SlotKV:
    """Keys and values of `batch` rows, slot p holding position p; what the model's attention updates."""

    def __init__(self, layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype, device):
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.batch, self.capacity = batch, capacity
        self.length = 0  # slots below this may be read
        self._rows = self._positions = None

    @classmethod
    def for_model(cls, config, batch: int, capacity: int, dtype, device) -> "SlotKV":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, batch, capacity, config.num_key_value_heads, head_dim, dtype, device)

    def fork(self, batch: int, capacity: int, upto: int) -> "SlotKV":
        """A new cache whose every row starts with row 0's slots [0, upto)."""
        first = self.keys[0]
        new = SlotKV(len(self.keys), batch, capacity, first.shape[1], first.shape[3], first.dtype, first.device)
        for mine, theirs in ((new.keys, self.keys), (new.values, self.values)):
            for layer in range(len(mine)):
                mine[layer][:, :, :upto] = theirs[layer][:1, :, :upto]
        new.length = upto
        return new

    def rows(self, lo: int, hi: int) -> "SlotKV":
        """Rows [lo, hi) as a cache of their own that writes into this one (views, no copy)."""
        view = SlotKV.__new__(SlotKV)
        view.keys = [k[lo:hi] for k in self.keys]
        view.values = [v[lo:hi] for v in self.values]
        view.batch, view.capacity, view.length = hi - lo, self.capacity, self.length
        view._rows = view._positions = None
        return view

    def copy_row(self, row: int, other: "SlotKV", other_row: int, start: int, end: int) -> None:
        """Slots [start, end) of `other`'s row `other_row` into this cache's row `row`."""
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            for layer in range(len(mine)):
                mine[layer][row, :, start:end] = theirs[layer][other_row, :, start:end]
        self.length = max(self.length, end)

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order): later forwards run on fewer rows."""
        index = torch.tensor(rows, device=self.keys[0].device)
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.batch = len(rows)

    def write_at(self, positions: torch.Tensor) -> None:
        """The positions [batch, tokens] the next forward writes."""
        self._positions = positions
        self._rows = torch.arange(self.batch, device=positions.device)[:, None].expand_as(positions)
        self.length = max(self.length, int(positions.max()) + 1)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.keys[layer_idx][self._rows, :, self._positions] = key.transpose(1, 2)
        self.values[layer_idx][self._rows, :, self._positions] = value.transpose(1, 2)
        return self.keys[layer_idx][:, :, : self.length], self.values[layer_idx][:, :, : self.length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


def masks(config, positions: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
    """Boolean [B, 1, S, L] masks by layer type: causal by position, windowed on sliding layers."""
    keys = torch.arange(length, device=positions.device)
    distance = positions[:, None, :, None] - keys  # query position minus key position
    causal = distance >= 0
    window = getattr(config, "sliding_window", None)
    sliding = causal & (distance < window) if window else causal
    return {"full_attention": causal, "sliding_attention": sliding}


def forward(body, config, ids: torch.Tensor, positions: torch.Tensor, kv: SlotKV) -> torch.Tensor:
    """Hidden states [B, S, H] of `ids` at `positions`, written into and attending over `kv`."""
    kv.write_at(positions)
    out = body(input_ids=ids, position_ids=positions, attention_mask=masks(config, positions, kv.length), cache=kv, use_cache=True)
    return out.last_hidden_state


def forward_packed(body, config, ids: list[list[int]], start: int, kv: SlotKV) -> list[torch.Tensor]:
    """Hidden states of several texts that each continue the one row of `kv` after its first
    `start` slots, packed one after another into one row instead of one row each.

    Each text takes positions start, start+1, ... and sees the shared slots and its own tokens
    only; packing saves copying the shared slots into a row per text (a passage of ~300 tokens
    and its ~20 queries in relabel), at the price of masked attention over the other texts."""
    device = kv.keys[0].device
    lengths = [len(t) for t in ids]
    flat = torch.tensor([[tok for t in ids for tok in t]], device=device)
    positions = torch.cat([start + torch.arange(n, device=device) for n in lengths])[None]
    groups = torch.cat([torch.full((n,), g, device=device) for g, n in enumerate(lengths)])
    slots = start + torch.arange(flat.shape[1], device=device)
    kv._rows, kv._positions, kv.length = torch.zeros_like(slots)[None], slots[None], start + flat.shape[1]
    key_positions = torch.cat([torch.arange(start, device=device), positions[0]])
    key_groups = torch.cat([torch.full((start,), -1, device=device), groups])
    distance = positions[0][:, None] - key_positions  # [tokens, keys]
    causal = ((key_groups == -1) | (key_groups == groups[:, None])) & (distance >= 0)
    window = getattr(config, "sliding_window", None)
    sliding = causal & (distance < window) if window else causal
    mask = {"full_attention": causal[None, None], "sliding_attention": sliding[None, None]}
    hidden = body(input_ids=flat, position_ids=positions, attention_mask=mask, cache=kv, use_cache=True).last_hidden_state[0]
    return list(hidden.split(lengths))
