"""The Triton kernels against the float64 definition, on CPU through the Triton interpreter."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the kernels run through the Triton interpreter
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="the triton backend needs the triton package")
pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")

from minigpt import MiniGPTError  # noqa: E402
from minigpt.cli import main  # noqa: E402
from minigpt.kernels import causal_attention  # noqa: E402
from minigpt.kernels import triton_attention  # noqa: E402
from minigpt.kernels.backends import reference_attention  # noqa: E402

assert triton_attention.INTERPRET, "tests/conftest.py sets TRITON_INTERPRET=1 before the kernels are imported"

FP32_TOLERANCE = 1e-5
KERNELS = {"prefill": triton_attention.prefill_attention, "decode": triton_attention.decode_attention}


def random_qkv(batch, heads, tq, tk, head_dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, t, head_dim, generator=generator) for t in (tq, tk, tk))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def assert_matches_reference(out, q, k, v, tolerance, key_lengths=None):
    reference = reference_attention(q, k, v, key_lengths)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    error = (out.double() - reference).abs().max().item()
    assert error <= tolerance, f"max |error| {error:.2e} > {tolerance:.0e}"


# (batch, heads, Tq, Tk): prefill not a multiple of the block, decode against 1, 17 and 300 keys, chunked prefill
CASES = [(3, 4, 37, 37), (1, 1, 37, 37), (3, 4, 1, 1), (3, 1, 1, 17), (1, 4, 1, 300), (3, 4, 5, 37), (1, 1, 5, 37)]


@pytest.mark.parametrize("head_dim", [16, 24, 32, 64])
@pytest.mark.parametrize("batch,heads,tq,tk", CASES)
def test_dispatch_matches_reference(batch, heads, tq, tk, head_dim):
    q, k, v = random_qkv(batch, heads, tq, tk, head_dim, seed=tq * 1000 + tk + head_dim)
    assert_matches_reference(causal_attention(q, k, v, backend="triton"), q, k, v, FP32_TOLERANCE)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("tq,tk", [(5, 37), (1, 40), (16, 16), (17, 33)])
def test_both_kernels_handle_every_offset(kernel, tq, tk):
    q, k, v = random_qkv(2, 2, tq, tk, 24, seed=tk)
    assert_matches_reference(KERNELS[kernel](q, k, v), q, k, v, FP32_TOLERANCE)


def test_decode_merges_many_splits():
    q, k, v = random_qkv(1, 2, 3, 200, 32, seed=5)
    for splits in (1, 3, 13):
        assert_matches_reference(triton_attention.decode_attention(q, k, v, num_splits=splits), q, k, v,
                                 FP32_TOLERANCE)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_strided_cache_views_are_read_in_place(kernel):
    """k and v as prefixes of a preallocated cache, q from a permuted qkv projection."""
    batch, heads, block, head_dim, length, tq = 2, 3, 64, 24, 29, 4
    cache = torch.randn(2, batch, heads, block, head_dim)
    k, v = cache[0, :, :, :length], cache[1, :, :, :length]
    q = torch.randn(batch, tq, 3, heads, head_dim).permute(2, 0, 3, 1, 4)[0]
    assert not (k.is_contiguous() or q.is_contiguous())
    assert_matches_reference(KERNELS[kernel](q, k, v), q, k, v, FP32_TOLERANCE)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("tq", [1, 3, 20])
def test_ragged_rows_read_only_their_own_keys(kernel, tq):
    """Rows at different lengths in one launch; keys past a row's length hold garbage that must not leak."""
    key_lengths = torch.tensor([tq, 45, tq + 7, 64])
    q, k, v = random_qkv(4, 2, tq, 64, 24, seed=tq)
    for row, length in enumerate(key_lengths.tolist()):
        k[row, :, length:], v[row, :, length:] = 1e4, -1e4
    assert_matches_reference(KERNELS[kernel](q, k, v, key_lengths), q, k, v, FP32_TOLERANCE, key_lengths)
    torch_out = causal_attention(q, k, v, key_lengths=key_lengths, backend="torch")
    assert_matches_reference(torch_out, q, k, v, FP32_TOLERANCE, key_lengths)


def test_ragged_decode_with_many_splits():
    key_lengths = torch.tensor([1, 130, 200])
    q, k, v = random_qkv(3, 2, 1, 200, 32, seed=9)
    for splits in (1, 4, 13):
        out = triton_attention.decode_attention(q, k, v, key_lengths, num_splits=splits)
        assert_matches_reference(out, q, k, v, FP32_TOLERANCE, key_lengths)


@pytest.mark.parametrize("dtype,kernel", [(torch.float16, "prefill"), (torch.float16, "decode"),
                                          (torch.bfloat16, "decode"), (torch.bfloat16, "prefill")])
def test_half_precision_inputs_accumulate_in_fp32(dtype, kernel):
    if dtype == torch.bfloat16 and kernel == "prefill":
        pytest.skip("the Triton interpreter's bf16 tl.dot returns garbage (seen with triton 3.9); "
                    "bf16 prefill can only be checked on a GPU")
    q, k, v = random_qkv(2, 2, 19 if kernel == "prefill" else 2, 19, 32, dtype=dtype)
    tolerance = 2e-3 if dtype == torch.float16 else 1.6e-2  # the output's own rounding dominates
    assert_matches_reference(KERNELS[kernel](q, k, v), q, k, v, tolerance)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 2), heads=st.integers(1, 3), head_dim=st.integers(4, 80),
       tq=st.integers(1, 24), extra_keys=st.integers(0, 30), seed=st.integers(0, 2**16))
def test_random_shapes_match_reference(batch, heads, head_dim, tq, extra_keys, seed):
    q, k, v = random_qkv(batch, heads, tq, tq + extra_keys, head_dim, seed=seed)
    assert_matches_reference(causal_attention(q, k, v, backend="triton"), q, k, v, FP32_TOLERANCE)


def test_unknown_backend_is_a_clear_error():
    q, k, v = random_qkv(1, 1, 2, 2, 8)
    with pytest.raises(MiniGPTError, match="auto, torch, triton"):
        causal_attention(q, k, v, backend="cuda")


def test_greedy_generation_with_triton_equals_torch(tiny_checkpoint, capsys):
    outputs = []
    for attention in ("torch", "triton"):
        assert main(["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "the quick",
                     "--max-new-tokens", "30", "--temperature", "0", "--attention", attention]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


def test_triton_on_cpu_without_the_interpreter_exits_2(tiny_checkpoint):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "minigpt", "generate", "--checkpoint", str(tiny_checkpoint),
                             "--attention", "triton", "--device", "cpu"], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "needs a CUDA GPU" in result.stderr and "--attention torch" in result.stderr
