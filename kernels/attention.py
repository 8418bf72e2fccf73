"""Causal attention where the queries are the *last* Tq positions of the keys.

One shape covers every use: training and prefill (Tq == Tk), decoding one
token against a cache (Tq == 1) and chunked prefill (1 < Tq < Tk). In a
ragged batch each row has its own number of keys (`key_lengths`): row b's
keys are its first key_lengths[b] positions and its queries the last Tq of them.
Here is the definition (`attention_weights`) and PyTorch's fused
`scaled_dot_product_attention` under the same masks; `minigpt.kernels.backends`
picks between it and our Triton kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def torch_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √D) v with query i of row b seeing keys 0 .. i + (Tk_b - Tq), through SDPA.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D) with Tk >= Tq, possibly strided views into a cache.
    key_lengths: (B,) each row's own Tk_b (keys past it are ignored); None: every row has all Tk."""
    tq, tk = q.shape[-2], k.shape[-2]
    if tk < tq:
        raise ValueError(f"causal_attention needs at least as many keys as queries, got Tq={tq}, Tk={tk}")
    if key_lengths is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ragged_causal_mask(tq, tk, key_lengths))
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if tq == 1:  # the newest position sees every key: no mask at all
        return F.scaled_dot_product_attention(q, k, v)
    # SDPA's is_causal aligns the mask top-left, which is wrong once the
    # queries sit at the end of a longer key sequence: build the offset mask.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(tq, tk, q.device))


def attention_weights(q: torch.Tensor, k: torch.Tensor, key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The definition: softmax(q kᵀ / √D) under the causal mask, (B, H, Tq, Tk), each row summing to 1.

    The kernels compute the same without ever holding the whole matrix; this writes it out, for the float64
    reference they are tested against and for pictures of what the model attends to (`minigpt.attention_maps`).
    """
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
