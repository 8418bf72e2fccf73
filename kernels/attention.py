"""Causal attention where the queries are the *last* Tq positions of the keys.

One shape covers every use: training and prefill (Tq == Tk), decoding one
token against a cache (Tq == 1) and chunked prefill (1 < Tq < Tk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √D) v with query i seeing keys 0 .. i + (Tk - Tq).

    q: (B, H, Tq, D); k, v: (B, H, Tk, D) with Tk >= Tq. Returns (B, H, Tq, D).
    """
    tq, tk = q.shape[-2], k.shape[-2]
    if _in_graph_capture():
        # An exported graph serves prefill and decode alike, so it keeps the
        # general offset mask rather than branching on today's shapes.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(tq, tk, q.device))
    if tk < tq:
        raise ValueError(f"causal_attention needs at least as many keys as queries, got Tq={tq}, Tk={tk}")
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if tq == 1:  # the newest position sees every key: no mask at all
        return F.scaled_dot_product_attention(q, k, v)
    # SDPA's is_causal aligns the mask top-left, which is wrong once the
    # queries sit at the end of a longer key sequence: build the offset mask.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(tq, tk, q.device))


def causal_mask(tq: int, tk: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where query i may attend to key j."""
    query_positions = torch.arange(tk - tq, tk, device=device)
    return torch.arange(tk, device=device)[None, :] <= query_positions[:, None]


def _in_graph_capture() -> bool:
    return torch.compiler.is_exporting() or torch.jit.is_tracing()
