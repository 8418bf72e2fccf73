"""Causal attention where the queries are the *last* Tq positions of the keys.

One shape covers every use: training and prefill (Tq == Tk), decoding one
token against a cache (Tq == 1) and chunked prefill (1 < Tq < Tk). In a
ragged batch each row has its own number of keys (`key_lengths`): row b's
keys are its first key_lengths[b] positions and its queries the last Tq of them.
Here is the definition (`attention_weights`) and its masks; the kernels that
compute it without writing the matrix out (PyTorch's SDPA, our Triton ones)
are in `minigpt.kernels.backends`.
"""

from __future__ import annotations

import math

import torch


def attention_weights(q: torch.Tensor, k: torch.Tensor, key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The definition: softmax(q kᵀ / √D) under the causal mask, (B, H, Tq, Tk), each row summing to 1. The
    kernels never hold this matrix; the tests' float64 reference and `minigpt.attention_maps` write it out."""
    tq, tk = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    visible = causal_mask(tq, tk, q.device) if key_lengths is None else ragged_causal_mask(tq, tk, key_lengths)
    return scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)


def causal_mask(tq: int, tk: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where query i may attend to key j."""
    query_positions = torch.arange(tk - tq, tk, device=device)
    return torch.arange(tk, device=device)[None, :] <= query_positions[:, None]


def ragged_causal_mask(tq: int, tk: int, key_lengths: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, Tq, Tk) mask: row b's query i sits at key_lengths[b] - Tq + i and sees keys up to it."""
    query_positions = key_lengths.view(-1, 1, 1, 1) - tq + torch.arange(tq, device=key_lengths.device).view(1, 1, -1, 1)
    return torch.arange(tk, device=key_lengths.device) <= query_positions
