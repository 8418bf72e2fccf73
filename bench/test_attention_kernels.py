"""The Triton attention kernels against PyTorch's, on a CUDA GPU (skipped elsewhere).

    pytest bench/test_attention_kernels.py     # alone: the test suite sets TRITON_INTERPRET=1

- prefill: causal, bf16, B·H = 32, D = 64, T from 512 to 8k: TFLOP/s of
  Triton, SDPA's flash backend and SDPA's plain math backend;
- decode: one query against a cache of 1k to 64k keys, batch 1 and 8, H = 8,
  D = 64: GB/s of keys and values read, Triton split-KV against SDPA;
- end to end: KV-cache generation tokens/s with --attention triton and torch.
"""

import pytest
import torch

from minigpt import GPTConfig, MiniGPT, Sampler
from minigpt.decoding import generate_rows
from minigpt.generation import KVCacheEngine

if not torch.cuda.is_available():
    pytest.skip("the attention kernels are timed on a CUDA GPU; none here", allow_module_level=True)
triton_attention = pytest.importorskip("minigpt.kernels.triton_attention", reason="needs the triton package")
if triton_attention.INTERPRET:
    pytest.skip("TRITON_INTERPRET=1 is set (the test suite sets it): run `pytest bench/` on its own",
                allow_module_level=True)

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from minigpt.kernels.backends import causal_attention, use_attention_backend  # noqa: E402

DEVICE = "cuda"


def timed(benchmark, fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    run()  # compile and autotune outside the timing
    return benchmark.pedantic(run, rounds=20, warmup_rounds=3)


def sdpa(backend):
    def attend(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] == k.shape[2])
    return attend


PREFILL = {"triton": lambda q, k, v: causal_attention(q, k, v, backend="triton"),
           "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
           "sdpa-math": sdpa(SDPBackend.MATH)}


@pytest.mark.parametrize("seq", [512, 1024, 2048, 4096, 8192])
@pytest.mark.parametrize("engine", list(PREFILL))
def test_prefill(benchmark, record_throughput, engine, seq):
    if engine == "sdpa-math" and seq > 4096:
        pytest.skip("the math backend materialises T x T scores: 8k needs too much memory and time")
    benchmark.group = f"prefill bf16 T={seq}"
    q, k, v = (torch.randn(4, 8, seq, 64, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    out = timed(benchmark, lambda: PREFILL[engine](q, k, v))
    reference = sdpa(SDPBackend.FLASH_ATTENTION)(q, k, v)
    assert (out.float() - reference.float()).abs().max().item() < 3e-2
    causal_flops = 4 * 4 * 8 * seq * seq * 64 / 2  # two matmuls, 2 flops a MAC, half the scores masked
    record_throughput(benchmark, engine, causal_flops / 1e12, "TFLOP/s")


DECODE = {"triton": lambda q, k, v: causal_attention(q, k, v, backend="triton"),
          "torch-sdpa": lambda q, k, v: causal_attention(q, k, v, backend="torch")}


@pytest.mark.parametrize("cache", [1024, 4096, 16384, 65536])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("engine", list(DECODE))
def test_decode(benchmark, record_throughput, engine, batch, cache):
    benchmark.group = f"decode bf16 batch {batch} cache {cache}"
    q = torch.randn(batch, 8, 1, 64, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, 8, cache, 64, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    out = timed(benchmark, lambda: DECODE[engine](q, k, v))
    assert (out.float() - DECODE["torch-sdpa"](q, k, v).float()).abs().max().item() < 2e-2
    bytes_read = 2 * k.numel() * k.element_size()  # keys and values, each read once
    record_throughput(benchmark, engine, bytes_read / 1e9, "GB/s")


@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_generate_end_to_end(benchmark, record_throughput, attention):
    benchmark.group = "generate on GPU, embed 512, 8 layers, block 1024, batch 8"
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=65, block_size=1024, embed_dim=512, num_heads=8, num_layers=8)
    model = use_attention_backend(MiniGPT(config).to(DEVICE).eval(), attention)
    engine = KVCacheEngine(model)
    produced = timed(benchmark, lambda: sum(len(ids) for ids in generate_rows(
        engine, [list(range(1, 9))] * 8, 512, Sampler(temperature=0))))
    assert produced == 8 * 512
    record_throughput(benchmark, "kv-cache" if attention == "torch" else "kv-cache-triton", 8 * 512)
