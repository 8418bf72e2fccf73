"""What each Triton kernel asks of a GPU, read from its compiled binary on a machine with no GPU.

Triton compiles for a named target without a device: `triton.compile` lowers
a kernel to PTX and a cubin for sm_80 (A100) or sm_90 (H100), and the
`cuobjdump` bundled with Triton's NVIDIA backend reads the cubin's
registers per thread, shared memory per block and local memory (spills).
What cannot be seen without a GPU, these numbers predict: a config that
spills runs from slow local memory, one that needs more shared memory than
the chip has fails to launch, and registers per thread cap how many warps an
SM can keep in flight (occupancy).

`measure(every_build())` compiles every kernel for every autotune config,
input dtype, head size and architecture; `python -m minigpt.kernels.resources`
prints the table `bench/README.md` shows. Compiling needs the kernels
defined for real, so this must run without TRITON_INTERPRET (each build
compiles in a worker process that drops it).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context


@dataclass(frozen=True)
class Chip:
    name: str
    shared_per_block: int  # the most shared memory one block may opt into
    shared_per_sm: int
    registers_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32


CHIPS = {80: Chip("A100", 163 * 1024, 164 * 1024), 90: Chip("H100", 227 * 1024, 228 * 1024)}
MAX_REGISTERS = 255  # per thread: more spills to local memory
DTYPES = ("fp16", "bf16", "fp32")
HEAD_DIMS = (64, 128)
WARP = 32


@dataclass(frozen=True)
class Build:
    """One kernel compiled one way: what `compile_build` needs."""

    kernel: str  # "prefill", "decode", "merge"
    arch: int
    dtype: str
    head_dim: int
    block_m: int = 0
    block_n: int = 0
    warps: int = 4
    stages: int = 3
    ragged: bool = False

    @property
    def config(self) -> str:
        blocks = {"prefill": f"{self.block_m}x{self.block_n}", "decode": f"n{self.block_n}",
                  "merge": f"s{self.block_n}"}[self.kernel]
        return f"{blocks} w{self.warps} s{self.stages}" + (" ragged" if self.ragged else "")


@dataclass(frozen=True)
class Usage:
    build: Build
    registers: int
    shared: int  # bytes per block
    spilled: int  # bytes of local memory and stack per thread
    wgmma: bool  # Hopper's warpgroup tensor-core instructions in the PTX

    @property
    def threads(self) -> int:
        return self.build.warps * WARP

    @property
    def fits(self) -> bool:
        chip = CHIPS[self.build.arch]
        return self.spilled == 0 and self.registers <= MAX_REGISTERS and self.shared <= chip.shared_per_block

    @property
    def occupancy(self) -> float:
        """Resident warps per SM over the most an SM can hold, as registers, shared memory and threads allow."""
        chip = CHIPS[self.build.arch]
        by_registers = chip.registers_per_sm // max(1, self.registers * self.threads)
        by_shared = chip.shared_per_sm // self.shared if self.shared else chip.blocks_per_sm
        by_threads = chip.threads_per_sm // self.threads
        blocks = min(by_registers, by_shared, by_threads, chip.blocks_per_sm)
        return blocks * self.threads / chip.threads_per_sm


def every_build() -> list[Build]:
    """Every kernel, for every config the kernels use, dtype, head size and architecture."""
    from minigpt.kernels.triton_attention import MERGE_MAX_SPLITS, decode_config, merge_warps, prefill_configs

    cases = [(arch, dtype, head) for arch in CHIPS for dtype in DTYPES for head in HEAD_DIMS]
    prefill = [Build("prefill", arch, dtype, head, m, n, warps, stages)
               for arch, dtype, head in cases for m, n, warps, stages in prefill_configs(dtype == "fp32", head)]
    decode = [Build("decode", arch, dtype, head, 0, decode_config(head)[0], decode_config(head)[1], 3, ragged)
              for arch, dtype, head in cases for ragged in (False, True)]
    merge = [Build("merge", arch, dtype, head, 0, MERGE_MAX_SPLITS, merge_warps(head), 3)
             for arch, dtype, head in cases]
    return prefill + decode + merge


def measure(builds: list[Build], processes: int | None = None) -> list[Usage]:
    """Compile every build (in fresh worker processes, several at once) and read its resources."""
    processes = processes or min(len(builds), os.cpu_count() or 1)
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn"), initializer=_compile_for_real) as pool:
        return list(pool.map(compile_build, builds))


def _compile_for_real() -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # read when a kernel is defined: before the kernels' import
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def cuobjdump() -> str | None:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return tool if os.path.exists(tool) else None


def compile_build(build: Build) -> Usage:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from minigpt.kernels import triton_attention as kernels

    element = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}[build.dtype]
    block_d = kernels._block_d(build.head_dim)
    if build.kernel == "prefill":
        fn = kernels._prefill_kernel
        constexprs = {"HEAD_DIM": build.head_dim, "BLOCK_M": build.block_m, "BLOCK_N": build.block_n,
                      "BLOCK_D": block_d, "PRECISION": "ieee" if build.dtype == "fp32" else "tf32",
                      "RAGGED": build.ragged}
        pointers = {"Q": element, "K": element, "V": element, "O": element, "KeyLengths": "*i32"}
    elif build.kernel == "decode":
        fn = kernels._decode_partial_kernel
        constexprs = {"HEAD_DIM": build.head_dim, "BLOCK_N": build.block_n, "BLOCK_D": block_d,
                      "RAGGED": build.ragged}
        pointers = {"Q": element, "K": element, "V": element, "KeyLengths": "*i32", "PartialO": "*fp32",
                    "PartialM": "*fp32", "PartialL": "*fp32"}
    else:
        fn = kernels._decode_merge_kernel
        constexprs = {"HEAD_DIM": build.head_dim, "BLOCK_D": block_d, "BLOCK_S": build.block_n}
        pointers = {"PartialO": "*fp32", "PartialM": "*fp32", "PartialL": "*fp32", "O": element}
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "fp32" if name == "qk_scale"
                                                                            else "i32")
                 for name in fn.arg_names}
    source = ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", build.arch, WARP),
                              options={"num_warps": build.warps, "num_stages": build.stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([cuobjdump(), "-res-usage", cubin.name], capture_output=True, text=True,
                                check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
    registers, stack, shared, local = map(int, found.groups())
    shared = max(shared, compiled.metadata.shared)  # Triton's dynamic shared memory is not in the static count
    return Usage(build, registers, shared, stack + local, "wgmma" in compiled.asm["ptx"])


def table(usages: list[Usage]) -> str:
    """The markdown table of `bench/README.md`."""
    lines = ["| kernel | config | dtype | head | arch | registers | shared (KB) | spilled (B) | occupancy | wgmma |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for u in usages:
        b = u.build
        lines.append(f"| {b.kernel} | {b.config} | {b.dtype} | {b.head_dim} | sm_{b.arch} | {u.registers} | "
                     f"{u.shared / 1024:.1f} | {u.spilled} | {u.occupancy:.0%} | {'yes' if u.wgmma else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(measure(every_build())))
