"""Causal attention where the queries are the *last* Tq positions of the keys.

One shape covers every use: training and prefill (Tq == Tk), decoding one
token against a cache (Tq == 1) and chunked prefill (1 < Tq < Tk). In a
ragged batch each row has its own number of keys (`key_lengths`): row b's
keys are its first key_lengths[b] positions and its queries the last Tq of them.
`causal_attention` dispatches to our Triton kernels on a GPU and to
PyTorch's `scaled_dot_product_attention` everywhere else.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from minigpt.errors import MiniGPTError

BACKENDS = ("auto", "torch", "triton")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     key_lengths: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """softmax(q kᵀ / √D) v with query i of row b seeing keys 0 .. i + (Tk_b - Tq).

    q: (B, H, Tq, D); k, v: (B, H, Tk, D) with Tk >= Tq, possibly strided
    views into a cache. key_lengths: (B,) integers <= Tk, each row's own Tk_b
    (keys past it are ignored); None means every row has all Tk.
    Returns (B, H, Tq, D) in q's dtype.
    backend: "torch" (SDPA), "triton" (our fused kernels), or "auto": Triton
    for CUDA tensors when no gradient is needed and the shape is supported.
    """
    if backend == "auto":
        backend = "triton" if _triton_fits(q, k, v) else "torch"
    if backend == "torch":
        return torch_causal_attention(q, k, v, key_lengths)
    _check_name(backend)
    return _triton_kernels(q).triton_causal_attention(q, k, v, key_lengths)


def torch_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           key_lengths: torch.Tensor | None = None) -> torch.Tensor:
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

    The kernels compute the same without ever holding the whole matrix; this
    writes it out, for the reference below and for pictures of what the model
    attends to (`MiniGPT.attention_maps`).
    """
    tq, tk = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    visible = causal_mask(tq, tk, q.device) if key_lengths is None else ragged_causal_mask(tq, tk, key_lengths)
    return scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The definition, in float64: what every kernel is tested against."""
    return attention_weights(q.double(), k.double(), key_lengths) @ v.double()


def causal_mask(tq: int, tk: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where query i may attend to key j."""
    query_positions = torch.arange(tk - tq, tk, device=device)
    return torch.arange(tk, device=device)[None, :] <= query_positions[:, None]


def ragged_causal_mask(tq: int, tk: int, key_lengths: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, Tq, Tk) mask: row b's query i sits at key_lengths[b] - Tq + i and sees keys up to it."""
    query_positions = key_lengths.view(-1, 1, 1, 1) - tq + torch.arange(tq, device=key_lengths.device).view(1, 1, -1, 1)
    return torch.arange(tk, device=key_lengths.device) <= query_positions


def check_backend(backend: str, device: torch.device | str) -> None:
    """Fail early, in one line, when `backend` cannot run on `device`."""
    _check_name(backend)
    if backend == "triton":
        _triton_kernels(torch.empty(0, device=device))


def _check_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise MiniGPTError(f"attention backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def _triton_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    if not q.is_cuda:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False  # training keeps PyTorch's differentiable attention
    try:
        kernels = _triton_kernels(q)
    except MiniGPTError:
        return False
    return kernels.supports(q)


def _triton_kernels(q: torch.Tensor):
    """The Triton module, or a one-line error saying why it cannot run on q's device."""
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise MiniGPTError("the triton attention backend needs a CUDA GPU; on CPU it runs only under "
                           "TRITON_INTERPRET=1 set before start (slow, for testing): use --attention torch")
    try:
        from minigpt.kernels import triton_attention
    except ImportError as exc:
        raise MiniGPTError(f"the triton attention backend needs the triton package ({exc}); "
                           "pip install 'minigpt[gpu]', or use --attention torch") from None
    if not q.is_cuda and not triton_attention.INTERPRET:
        raise MiniGPTError("Triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run "
                           "on CPU; set it before starting Python, or use --attention torch")
    return triton_attention
