"""The one entry point for attention, `causal_attention`: our Triton kernels on a GPU, PyTorch's SDPA
everywhere else (`minigpt.kernels.attention` holds the definition both compute)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from minigpt.errors import MiniGPTError
from minigpt.kernels.attention import attention_weights, causal_mask, ragged_causal_mask

BACKENDS = ("auto", "torch", "triton")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     key_lengths: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """The definition's answer (its shapes), in q's dtype, computed by `backend`: "torch" (SDPA),
    "triton" (our fused kernels), or "auto": Triton for CUDA tensors when no gradient is needed and the shape
    is supported."""
    if backend == "auto":
        backend = "triton" if _triton_fits(q, k, v) else "torch"
    if backend == "torch":
        return torch_causal_attention(q, k, v, key_lengths)
    _check_name(backend)
    return _triton_kernels(q).triton_causal_attention(q, k, v, key_lengths)


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


def use_attention_backend(model, backend: str):
    """Route every layer of a MiniGPT through "auto", "torch" or "triton" kernels; returns the model."""
    check_backend(backend, model.tok_emb.weight.device)
    for block in model.blocks:
        block.attn.attention_backend = backend
    return model


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


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The definition, in float64: what every kernel is tested against."""
    return attention_weights(q.double(), k.double(), key_lengths) @ v.double()
