"""Fused causal attention in Triton: a FlashAttention-style prefill kernel and a split-KV decode kernel.

Both compute softmax(q kᵀ / √D) v with query i seeing keys 0 .. i + (Tk - Tq),
the contract of `causal_attention`, without ever materialising the Tq × Tk
score matrix: keys are visited block by block and the softmax is kept as a
running maximum and sum ("online softmax"), in fp32 whatever the input dtype.

- Prefill (many queries): one program per (query block, batch·head). Key
  blocks wholly above the diagonal are never visited (causal block skipping);
  blocks wholly below it run without a mask; only the blocks the diagonal
  crosses pay for one.
- Decode (a few queries, a long cache): one query row has too little work to
  fill a GPU, so the keys are split across programs (Flash-Decoding). Each
  writes a partial maximum, sum and output; a second kernel merges them.

Inputs are read through their strides, so k and v may be views into a
preallocated cache. In a ragged batch (RAGGED) each row reads its own key
count from `key_lengths`, so rows at different lengths share one launch.
`reference_attention` in `backends.py` is the float64 definition both
kernels are tested against.

Triton reads TRITON_INTERPRET when a kernel is defined, that is when this
module is imported: with it set to 1 the kernels run on CPU tensors (slowly),
which is how the test suite checks them on machines without a GPU.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x · log2 e), and exp2 is the fast one
MAX_HEAD_DIM = 128
DECODE_MAX_QUERIES = 8  # up to this many queries take the split-KV decode path
MERGE_MAX_SPLITS = 256  # the most key slices one decode splits into


def supports(q: torch.Tensor) -> bool:
    return q.shape[-1] <= MAX_HEAD_DIM and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------- prefill


@triton.jit
def _attend_key_block(acc, m_i, l_i, q, k_block_ptrs, v_block_ptrs, start_n, offs_m, offs_n, d_mask,
                      stride_kt, stride_vt, tk, offset, qk_scale,
                      MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one block of keys and values into the running (acc, max, sum) of a block of queries."""
    key_pos = start_n + offs_n
    k = tl.load(k_block_ptrs + start_n * stride_kt, mask=(key_pos[:, None] < tk) & d_mask[None, :], other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:  # the block the diagonal crosses, or the ragged end of the keys
        visible = (key_pos[None, :] <= offs_m[:, None] + offset) & (key_pos[None, :] < tk)
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old maximum
    p = tl.exp2(scores - m_new[:, None])
    v = tl.load(v_block_ptrs + start_n * stride_vt, mask=(key_pos[:, None] < tk) & d_mask[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _prefill_kernel(Q, K, V, O, KeyLengths,
                    stride_qb, stride_qh, stride_qt, stride_qd,
                    stride_kb, stride_kh, stride_kt, stride_kd,
                    stride_vb, stride_vh, stride_vt, stride_vd,
                    stride_ob, stride_oh, stride_ot, stride_od,
                    num_heads, tq, tk, qk_scale, seq_bucket,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, RAGGED: tl.constexpr):
    # seq_bucket (tk rounded up to a power of two) is only the autotuner's key.
    block_m = tl.program_id(0)
    batch, head = tl.program_id(1) // num_heads, tl.program_id(1) % num_heads
    if RAGGED:  # this row's own number of keys
        tk = tl.load(KeyLengths + batch)
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM  # BLOCK_D is HEAD_DIM rounded up to a power of two
    q_ptrs = Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < tq) & d_mask[None, :], other=0.0)
    k_ptrs = K + batch * stride_kb + head * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_ptrs = V + batch * stride_vb + head * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offset = tk - tq  # query i sits at key position i + offset
    # Keys every query of this block may see: no mask needed below `unmasked_end`.
    unmasked_end = ((offset + block_m * BLOCK_M + 1) // BLOCK_N) * BLOCK_N
    # Keys past the last query's reach are never visited.
    visited_end = tl.minimum(tk, offset + (block_m + 1) * BLOCK_M)
    for start_n in range(0, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _attend_key_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, d_mask,
                                          stride_kt, stride_vt, tk, offset, qk_scale, False, PRECISION)
    for start_n in range(unmasked_end, visited_end, BLOCK_N):
        acc, m_i, l_i = _attend_key_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, d_mask,
                                          stride_kt, stride_vt, tk, offset, qk_scale, True, PRECISION)
    # Key 0 is visible to every query, so l_i > 0 for every real row.
    out = acc / l_i[:, None]
    o_ptrs = O + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < tq) & d_mask[None, :])


# (BLOCK_M, BLOCK_N, warps, stages) by (fp32 inputs, head_dim over 64): the configs that compile for both
# sm_80 and sm_90 with no register spills, as `python -m minigpt.kernels.resources` measures them (the table
# is in bench/README.md, and tests/test_kernel_resources.py holds every one to it). Everything else tried
# spills on one of them or both: 128x64 with 4 warps, 128x128 and 64x64 tiles at any head size; every
# tile over 64x32 at head 128; in fp32 (no tensor cores: the products are FMAs) all but the small tiles.
PREFILL_CONFIGS = {(False, False): [(128, 64, 8, 3), (64, 32, 4, 4)],
                   (False, True): [(64, 32, 8, 3), (64, 16, 4, 3)],
                   (True, False): [(64, 32, 8, 3), (32, 16, 4, 3), (16, 16, 4, 2)],
                   (True, True): [(16, 16, 4, 2)]}


def prefill_configs(fp32: bool, head_dim: int) -> list[tuple[int, int, int, int]]:
    return PREFILL_CONFIGS[fp32, _block_d(head_dim) > 64]


def _keep_configs_that_fit(configs, named_args, **meta):
    meta = {**named_args, **meta}
    fitting = prefill_configs(meta["PRECISION"] == "ieee", meta["HEAD_DIM"])
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in fitting]


# Tuned once per power-of-two length, not per length: prompts come in every size.
_prefill_autotuned = triton.autotune(
    [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
     for m, n, w, s in dict.fromkeys(c for configs in PREFILL_CONFIGS.values() for c in configs)],
    key=["seq_bucket", "HEAD_DIM", "PRECISION", "RAGGED"],
    prune_configs_by={"early_config_prune": _keep_configs_that_fit})(_prefill_kernel)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: torch.Tensor | None = None,
                      *, block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """The prefill kernel; block sizes are autotuned on a GPU, small and fixed under the interpreter."""
    batch, heads, tq, head_dim = q.shape
    tk = k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    args = (q, k, v, out, _lengths_arg(key_lengths, q), *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            heads, tq, tk, LOG2E / math.sqrt(head_dim), triton.next_power_of_2(tk))
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), PRECISION=_precision(q),
                RAGGED=key_lengths is not None)
    if INTERPRET or block_m is not None:
        block_m, block_n = block_m or 16, block_n or 16
        grid = (triton.cdiv(tq, block_m), batch * heads)
        _prefill_kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n)
    else:
        grid = lambda config: (triton.cdiv(tq, config["BLOCK_M"]), batch * heads)  # noqa: E731
        _prefill_autotuned[grid](*args, **meta)
    return out


# ----------------------------------------------------------------------------------------------- decode


@triton.jit
def _decode_partial_kernel(Q, K, V, KeyLengths, PartialO, PartialM, PartialL,
                           stride_qb, stride_qh, stride_qt, stride_qd,
                           stride_kb, stride_kh, stride_kt, stride_kd,
                           stride_vb, stride_vh, stride_vt, stride_vd,
                           num_heads, tq, tk, qk_scale, keys_per_split, num_splits,
                           HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           RAGGED: tl.constexpr):
    """One query row against one slice of the keys: a partial maximum, sum and output."""
    row, split = tl.program_id(0), tl.program_id(1)  # row runs over batch · head · query
    query = row % tq
    batch, head = (row // tq) // num_heads, (row // tq) % num_heads
    if RAGGED:  # this row's own number of keys; splits past it store an empty partial
        tk = tl.load(KeyLengths + batch)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + batch * stride_qb + head * stride_qh + query * stride_qt + offs_d * stride_qd,
                mask=d_mask, other=0.0).to(tl.float32)
    k_ptrs = K + batch * stride_kb + head * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_ptrs = V + batch * stride_vb + head * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd

    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, query + tk - tq + 1)  # this query's reach, causally
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        key_pos = start_n + offs_n
        in_range = key_pos < end
        k = tl.load(k_ptrs + start_n * stride_kt, mask=in_range[:, None] & d_mask[None, :], other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * qk_scale
        scores = tl.where(in_range, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new)
        v = tl.load(v_ptrs + start_n * stride_vt, mask=in_range[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    # A split wholly past the query's reach stores max -inf and sum 0: it weighs nothing when merged.
    partial = row * num_splits + split
    tl.store(PartialO + partial * BLOCK_D + offs_d, acc)
    tl.store(PartialM + partial, m_i)
    tl.store(PartialL + partial, l_i)


@triton.jit
def _decode_merge_kernel(PartialO, PartialM, PartialL, O,
                         stride_ob, stride_oh, stride_ot, stride_od,
                         num_heads, tq, num_splits,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge a row's partial softmaxes: rescale each to the global maximum, then normalise once."""
    row = tl.program_id(0)
    query = row % tq
    batch, head = (row // tq) // num_heads, (row // tq) % num_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    m = tl.load(PartialM + row * num_splits + offs_s, mask=s_mask, other=float("-inf"))
    l = tl.load(PartialL + row * num_splits + offs_s, mask=s_mask, other=0.0)
    acc = tl.load(PartialO + (row * num_splits + offs_s[:, None]) * BLOCK_D + offs_d[None, :],
                  mask=s_mask[:, None], other=0.0)
    m_max = tl.max(m, axis=0)  # finite: split 0 always holds key 0
    weight = tl.exp2(m - m_max)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
    tl.store(O + batch * stride_ob + head * stride_oh + query * stride_ot + offs_d * stride_od,
             out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: torch.Tensor | None = None,
                     *, num_splits: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """The split-KV decode kernels: partial results per key slice, then one merge per query row."""
    batch, heads, tq, head_dim = q.shape
    tk = k.shape[2]
    rows = batch * heads * tq
    default_block_n, warps = decode_config(head_dim)
    block_n = block_n or (16 if INTERPRET else default_block_n)
    if num_splits is None:
        num_splits = _decode_splits(rows, tk, block_n, q.device)
    keys_per_split = triton.cdiv(triton.cdiv(tk, num_splits), block_n) * block_n
    num_splits = triton.cdiv(tk, keys_per_split)
    block_d = _block_d(head_dim)
    partial_o = torch.empty((rows, num_splits, block_d), dtype=torch.float32, device=q.device)
    partial_m = torch.empty((rows, num_splits), dtype=torch.float32, device=q.device)
    partial_l = torch.empty((rows, num_splits), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    _decode_partial_kernel[(rows, num_splits)](
        q, k, v, _lengths_arg(key_lengths, q), partial_o, partial_m, partial_l, *q.stride(), *k.stride(),
        *v.stride(), heads, tq, tk, LOG2E / math.sqrt(head_dim), keys_per_split, num_splits,
        HEAD_DIM=head_dim, BLOCK_N=block_n, BLOCK_D=block_d, RAGGED=key_lengths is not None, num_warps=warps)
    _decode_merge_kernel[(rows,)](
        partial_o, partial_m, partial_l, out, *out.stride(), heads, tq, num_splits,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
        num_warps=merge_warps(head_dim))
    return out


def decode_config(head_dim: int) -> tuple[int, int]:
    """(keys a decode program reads per step, its warps): 64 keys and 4 warps spill at head 128 (672 bytes on
    sm_80 and sm_90); 16 keys and 4 warps fit in 125 registers there, 25% occupancy."""
    return (64, 4) if _block_d(head_dim) <= 64 else (16, 4)


def merge_warps(head_dim: int) -> int:
    """A merge of MERGE_MAX_SPLITS partial outputs of 128 values spills with 4 warps; 8 share it."""
    return 4 if _block_d(head_dim) <= 64 else 8


def _decode_splits(rows: int, tk: int, block_n: int, device: torch.device) -> int:
    """Enough key slices that rows × slices programs fill the GPU, each slice at least a few blocks long."""
    if INTERPRET:
        return triton.cdiv(tk, 4 * block_n)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(4 * sm_count, rows)  # a few waves of programs
    return max(1, min(wanted, triton.cdiv(tk, 4 * block_n), MERGE_MAX_SPLITS))


# ---------------------------------------------------------------------------------------------- helpers


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot wants each side at least 16


def _precision(q: torch.Tensor) -> str:
    # fp32 inputs get full-precision products (tf32 would cost ~1e-3 of accuracy);
    # fp16 and bf16 go to the tensor cores as they are.
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _lengths_arg(key_lengths: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """Per-row key counts as the kernels read them (int32); q stands in when there are none (never read)."""
    return q if key_lengths is None else key_lengths.to(device=q.device, dtype=torch.int32)


def triton_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    if q.shape[2] <= DECODE_MAX_QUERIES:
        return decode_attention(q, k, v, key_lengths)
    return prefill_attention(q, k, v, key_lengths)
