"""The KV-cache: every layer's keys and values, preallocated, written at positions the caller gives.

Decoding one token needs the keys and values of every earlier position. The
cache keeps them in a static buffer (gpt-fast's design): a forward pass writes
its new positions in place and attention reads a view of the filled prefix.
Which positions of a row are valid is the caller's to know and to pass
(`minigpt.rows.Rows`), so rows may sit at different lengths (a ragged batch).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from minigpt.config import GPTConfig
from minigpt.devices import check_memory


class Positions:
    """Where one forward pass's T new tokens sit: row b's at start_pos[b] .. start_pos[b] + T - 1. Rows that
    share a start write one slice and need no mask; ragged rows write at their own positions."""

    def __init__(self, seq: int, start_pos: np.ndarray | None = None, device: torch.device | None = None):
        self.seq = seq
        first = 0 if start_pos is None or len(start_pos) == 0 else int(start_pos[0])
        shared = start_pos is None or len(start_pos) <= 1 or bool((start_pos == first).all())
        self.start = first if shared else None  # the shared start, if there is one
        self.end = (first if shared else int(start_pos.max())) + seq  # keys attention reads: 0 .. end-1
        # Only for ragged rows: each row's positions (B, T) and its key count after this pass.
        self.index = self.key_lengths = None
        if not shared:
            starts = torch.from_numpy(np.asarray(start_pos, dtype=np.int64)).to(device)
            self.index = starts[:, None] + torch.arange(seq, device=device)
            self.key_lengths = starts + seq

    def embed(self, table: nn.Embedding) -> torch.Tensor:
        """The position embeddings of the new tokens: (T, E) when rows share a start, else (B, T, E)."""
        if self.start is not None:  # a slice of the table, not a lookup: no index tensor to build each step
            return table.weight[self.start:self.end]
        return table(self.index)


class LayerCache:
    """One layer's keys and values side by side, (2, B, H, block_size, D): one copy stores both."""

    def __init__(self, kv: torch.Tensor):
        self.kv = kv

    def update(self, kv: torch.Tensor, where: Positions) -> tuple[torch.Tensor, torch.Tensor]:
        """Store kv (2, B, H, T, D) at the rows' new positions; return the keys and values 0 .. end-1."""
        if where.start is not None:
            self.kv.narrow(3, where.start, where.seq).copy_(kv)
        else:
            two, batch, heads, seq, head_dim = kv.shape
            index = where.index.view(1, batch, 1, seq, 1).expand(two, batch, heads, seq, head_dim)
            self.kv.scatter_(3, index, kv)
        return self.kv.narrow(3, 0, where.end).unbind(0)


class KVCache:
    """Every layer's keys and values for a batch of rows: kv is (layers, 2, batch, heads, block_size, head_dim)."""

    def __init__(self, kv: torch.Tensor):
        self.kv = kv
        self.layers = [LayerCache(layer) for layer in kv.unbind(0)]  # views, made once

    @classmethod
    def empty(cls, config: GPTConfig, batch_size: int, dtype: torch.dtype, device: torch.device) -> "KVCache":
        shape = (config.num_layers, 2, batch_size, config.num_heads, config.block_size, config.head_dim)
        check_memory(math.prod(shape) * dtype.itemsize, f"a KV-cache of {batch_size:,} rows", "lower --num-samples "
                     "(or serve's --max-batch)", device)
        return cls(torch.zeros(shape, dtype=dtype, device=device))
