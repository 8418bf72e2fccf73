"""GPU readiness without a GPU: every Triton kernel compiled for A100 (sm_80) and H100 (sm_90) on this machine.

The interpreter runs the kernels as numpy and cannot see what fails on real
hardware; the compiled binaries can: registers, spills to local memory,
shared memory, tensor-core instructions. `minigpt.kernels.resources` reads
them; these tests hold every build the kernels use to the limits.
"""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # compiles every kernel for two GPU architectures

triton = pytest.importorskip("triton", reason="the Triton kernels need triton (the gpu extra)")

from minigpt.kernels import resources  # noqa: E402


@pytest.fixture(scope="module")
def usages():
    if resources.cuobjdump() is None:
        pytest.skip("this triton wheel has no bundled cuobjdump to read compiled kernels with")
    return resources.measure(resources.every_build())


def test_every_build_covers_every_kernel_dtype_head_and_arch(usages):
    cases = {(u.build.kernel, u.build.arch, u.build.dtype, u.build.head_dim) for u in usages}
    assert cases == {(kernel, arch, dtype, head) for kernel in ("prefill", "decode", "merge")
                     for arch in (80, 90) for dtype in ("fp16", "bf16", "fp32") for head in (64, 128)}
    assert {u.build.ragged for u in usages if u.build.kernel == "decode"} == {False, True}


def test_every_kernel_fits_both_gpus(usages):
    misfits = [f"{u.build.kernel} {u.build.config} {u.build.dtype} head {u.build.head_dim} sm_{u.build.arch}: "
               f"{u.registers} registers, {u.spilled} bytes spilled, {u.shared} bytes shared"
               for u in usages if not u.fits]
    assert not misfits, "\n".join(misfits)


def test_hopper_prefill_runs_on_warpgroup_tensor_cores(usages):
    prefill = [u for u in usages if u.build.kernel == "prefill" and u.build.dtype != "fp32"]
    assert all(u.wgmma == (u.build.arch == 90) for u in prefill), [u.build for u in prefill if not u.wgmma]


def test_per_row_lengths_cost_the_decode_kernel_no_real_registers(usages):
    decode = {(u.build.arch, u.build.dtype, u.build.head_dim, u.build.ragged): u.registers
              for u in usages if u.build.kernel == "decode"}
    for (arch, dtype, head, ragged), registers in decode.items():
        if ragged:
            assert registers <= decode[arch, dtype, head, False] + 8


def test_the_autotuner_only_tries_configs_that_fit():
    from minigpt.kernels import triton_attention as kernels

    configs = kernels._prefill_autotuned.configs
    for fp32 in (False, True):
        for head in (32, 64, 96, 128):
            kept = kernels._keep_configs_that_fit(configs, {}, PRECISION="ieee" if fp32 else "tf32", HEAD_DIM=head)
            assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept] == \
                kernels.prefill_configs(fp32, head)
            assert kept


def test_the_gpu_paths_import_and_build_without_a_gpu():
    """Every module imports with the kernels defined for real (no interpreter) and no CUDA call is made on the
    way; the training step's bf16 autocast and fused optimizer are built for a CUDA device."""
    script = textwrap.dedent("""
        import importlib, os, pkgutil, sys
        os.environ.pop("TRITON_INTERPRET", None)
        import torch
        import minigpt
        for module in pkgutil.walk_packages(minigpt.__path__, "minigpt."):
            if module.name != "minigpt.__main__":
                importlib.import_module(module.name)
        from minigpt.kernels import triton_attention
        assert not triton_attention.INTERPRET and type(triton_attention._prefill_kernel).__name__ == "JITFunction"
        assert not torch.cuda.is_initialized(), "a module touched CUDA when imported"
        from minigpt.config import GPTConfig, TrainConfig
        from minigpt.model import MiniGPT
        from minigpt.training import autocast_for, make_optimizer
        cuda = torch.device("cuda")
        autocast = autocast_for(cuda)
        assert autocast.device == "cuda" and autocast.fast_dtype == torch.bfloat16
        optimizer = make_optimizer(MiniGPT(GPTConfig(vocab_size=8)), TrainConfig(), cuda)
        assert optimizer.defaults["fused"] is True
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "HOME": "/tmp"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
