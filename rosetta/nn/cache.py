"""The KV cache: keys and values of every layer in preallocated tensors [slots, kv_heads, capacity, head_dim].

A batch of sequences shares one column clock: every decode step writes the same column for every row.
A row's tokens fill a contiguous run of columns that ends at that shared column and starts wherever the row
joined (left padding, in effect), so one bool per (row, column) is never needed: a row's first column says
which keys it may see. Masks are built only where some row must not see some column; otherwise attention
runs unmasked (decode) or with the causal flag (a fresh prefill), the fastest kernels for each.

An encoder-decoder (Whisper) also keeps, per row, the keys and values its cross-attention reads: computed
once from the encoder's output when the row's request is admitted, and moved with the row.
"""

from __future__ import annotations

import torch


class CacheWindow:
    """Where one forward pass's tokens go, and which keys they attend to: what attention layers see."""

    def __init__(self, cache: KVCache | None, rows: slice, start: int, attend_from: int,
                 mask: torch.Tensor | None, is_causal: bool):
        self.cache, self.rows, self.start, self.attend_from = cache, rows, start, attend_from
        self.mask, self.is_causal = mask, is_causal

    @classmethod
    def uncached(cls, mask: torch.Tensor | None = None) -> CacheWindow:
        """A whole-sequence pass that stores nothing: causal, or `mask` [B, 1, L, L] where there is padding."""
        return cls(None, slice(None), 0, 0, mask, mask is None)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this pass's keys and values [rows, kv_heads, L, head_dim]; return every key and value attended."""
        if self.cache is None:
            return k, v
        end = self.start + k.shape[2]
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[self.rows, :, self.start : end] = k
        values[self.rows, :, self.start : end] = v
        if self.attend_from == self.start:  # nothing older to see: what we just computed is all there is
            return k, v
        return keys[self.rows, :, self.attend_from : end], values[self.rows, :, self.attend_from : end]

    def context(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention keys and values [rows, heads, S, head_dim] of this pass's rows."""
        return self.cache.context_keys[layer][self.rows], self.cache.context_values[layer][self.rows]


def attention_mask(first: torch.Tensor, query_columns: torch.Tensor, key_columns: torch.Tensor,
                   sliding_window: int | None = None) -> torch.Tensor:
    """Bool mask [rows, 1, L, S]: a query sees the keys of its own row, up to itself (and within the window).

    `first` [rows] is each row's first real column. A padding query (before its row's first column) sees only
    itself, so that no softmax row is empty (its output is never used, but NaNs would spread through matmuls).
    """
    q, k = query_columns[:, None], key_columns[None, :]
    mask = (k >= first[:, None, None]) & (k <= q)
    if sliding_window is not None:
        mask &= q - k < sliding_window
    return (mask | (k == q))[:, None]


class KVCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, slots: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", sliding_window: int | None = None,
                 context: tuple[int, int] | None = None):
        """`context` (heads, length): room per row for cross-attention keys and values of that shape."""
        shape = (slots, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.sliding_window = sliding_window
        self.context_keys: list[torch.Tensor] = []
        self.context_values: list[torch.Tensor] = []
        if context is not None:
            heads, length = context
            shape = (slots, heads, length, head_dim)
            self.context_keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
            self.context_values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def window(self, rows: slice, start: int, length: int, first: torch.Tensor) -> CacheWindow:
        """A pass writing columns [start, start + length) of `rows`, whose real tokens begin at `first` [rows]."""
        end = start + length
        if end > self.capacity:
            raise ValueError(f"cache holds {self.capacity} columns; this pass writes up to column {end}")
        attend_from = int(first.min())
        uniform = bool((first == attend_from).all())
        windowed = self.sliding_window is not None and end - attend_from > self.sliding_window
        if uniform and not windowed and (length == 1 or attend_from == start):
            return CacheWindow(self, rows, start, attend_from, None, is_causal=length > 1)
        device = self.device
        mask = attention_mask(first.to(device), torch.arange(start, end, device=device),
                              torch.arange(attend_from, end, device=device), self.sliding_window)
        return CacheWindow(self, rows, start, attend_from, mask, is_causal=False)

    def grow(self, capacity: int) -> None:
        """Room for `capacity` columns, keeping what is stored (doubling, so growth is rare)."""
        if capacity <= self.capacity:
            return
        capacity = max(capacity, 2 * self.capacity)
        for tensors in (self.keys, self.values):
            for i, old in enumerate(tensors):
                new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
                new[:, :, : old.shape[2]] = old
                tensors[i] = new

    def shift(self, rows: slice, columns: slice, by: int) -> None:
        """Move the stored `columns` of `rows` by `by` columns (left when negative)."""
        start, stop = columns.start, columns.stop
        for tensors in (self.keys, self.values):
            for t in tensors:
                t[rows, :, start + by : stop + by] = t[rows, :, start:stop].clone()

    def move_row(self, source: int, target: int, columns: slice) -> None:
        """Copy one row's stored columns (and its context) into another slot (filling a finished row's gap)."""
        for tensors in (self.keys, self.values):
            for t in tensors:
                t[target, :, columns] = t[source, :, columns]
        for tensors in (self.context_keys, self.context_values):
            for t in tensors:
                t[target] = t[source]

    def reorder(self, rows: torch.Tensor, columns: slice) -> None:
        """Row i becomes a copy of row `rows[i]` (beam search keeps the beams that survive). Contexts are left:
        the beams of one search share theirs."""
        n = len(rows)
        for tensors in (self.keys, self.values):
            for t in tensors:
                t[:n, :, columns] = t[rows, :, columns]
