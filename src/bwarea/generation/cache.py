"""Key/value caches for decoding and for scoring many actions over one context.

Each object has the ``update(k, v) -> (keys, values)`` that the model's ``Attention`` calls: it stores the new
positions' keys and values and returns everything attention should see. The model's maths therefore runs the
same over a cache as without one; only what ``update`` keeps and returns differs.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """Keys and values of one attention block, preallocated for a whole generation and written in place.

    keys / values: (rows, kv_heads, max_len, head_dim). ``update(k, v)`` (prefill) writes the new positions
    after the ones held and returns views of everything held so far; decode steps write one column through
    ``at(col)``. ``buffer_rows`` > rows allocates spare rows (a backend that replays a captured step at a
    bucketed batch size reads them as ``full_keys`` / ``full_values``; ``keys`` / ``values`` stay the real rows).
    """

    def __init__(self, rows: int, kv_heads: int, max_len: int, head_dim: int, dtype, device,
                 buffer_rows: int | None = None):
        self.full_keys = torch.zeros(buffer_rows or rows, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.full_values = torch.zeros_like(self.full_keys)
        self.keys, self.values = self.full_keys[:rows], self.full_values[:rows]
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache holds {self.keys.shape[2]} positions, asked to write {start}..{end}")
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def at(self, col, full: bool = False) -> "ColumnWrite":
        """The cache as one decode step sees it: the step's keys/values go to column ``col`` (an int, or a (1,)
        long tensor inside a captured step); attention gets columns ..col, or every column with ``full``."""
        return ColumnWrite(self, col, full)


class ColumnWrite:
    """``StaticKVCache.at``: one decode position's view of the cache."""

    def __init__(self, cache: StaticKVCache, col, full: bool):
        self.cache, self.col, self.full = cache, col, full

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        keys, values = (c.full_keys, c.full_values) if self.full else (c.keys, c.values)
        if torch.is_tensor(self.col):
            # index_copy_ with a device index: no host sync and no shape that depends on the step (graph capture).
            keys.index_copy_(2, self.col, k)
            values.index_copy_(2, self.col, v)
        else:
            keys[:, :, self.col] = k[:, :, 0]
            values[:, :, self.col] = v[:, :, 0]
        if self.full:
            return keys, values
        return keys[:, :, :self.col + 1], values[:, :, :self.col + 1]


class PrefixKVCache:
    """A shared context's keys/values followed by each query row's own: many action variants, one context.

    keys / values: (batch, kv_heads, prefix, head_dim); the queries come ``copies`` rows per batch row.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, copies: int):
        self.keys, self.values = (t.repeat_interleave(copies, dim=0) for t in (keys, values))

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)


def make_caches(model, trunk, rows: int, max_len: int, layers=None, buffer_rows: int | None = None) -> list:
    """One StaticKVCache per block of ``trunk`` (None for blocks outside ``layers``)."""
    c = model.config
    weight = trunk.embed_tokens.weight
    wanted = range(len(trunk.layers)) if layers is None else layers
    return [StaticKVCache(rows, c.num_key_value_heads, max_len, c.head_dim, weight.dtype, weight.device,
                          buffer_rows) if i in wanted else None for i in range(len(trunk.layers))]


def shared_context(caches, prefix: int, copies: int) -> list:
    """Upper-block caches of a scored context -> per block a PrefixKVCache of the first ``prefix`` positions for
    ``copies`` query rows per batch row (None for blocks below the action)."""
    return [None if c is None else PrefixKVCache(c.keys[:, :, :prefix], c.values[:, :, :prefix], copies)
            for c in caches]
