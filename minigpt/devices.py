"""Where code runs: the one place that reads a device name or a thread count (torch is imported only to
resolve a device, so the onnxruntime path and the config checks stay torch-free)."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

from minigpt.errors import ConfigError, MiniGPTError

DEVICE_NAMES = "auto, cpu or cuda (cuda:N for one GPU of several)"


def check_device_name(name) -> None:
    if not isinstance(name, str) or not (name in ("auto", "cpu", "cuda")
                                         or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ConfigError(f"device must be {DEVICE_NAMES}, got {name!r}")


def resolve_device(name: str):
    """The torch.device for a name: auto is CUDA when there is a GPU, else the CPU."""
    import torch

    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def check_threads(threads) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise MiniGPTError(f"threads must be a positive integer, got {threads}")


def available_memory(device) -> int | None:
    """Bytes free for new tensors on `device` (a torch.device): the GPU's free memory, or the machine's
    available memory (Linux' MemAvailable); None when it cannot be told."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_memory(needed: int, what: str, fix: str, device=None) -> None:
    """Refuse before allocating when `needed` bytes cannot fit (a traceback from the allocator otherwise, or
    a machine swapping to a halt)."""
    free = available_memory(device)
    if free is not None and needed > free:
        where = "the GPU" if getattr(device, "type", "cpu") == "cuda" else "this machine"
        raise MiniGPTError(f"{what} needs {needed / 2**30:,.1f} GiB and {where} has {free / 2**30:,.1f} GiB "
                           f"available; {fix}")


SMALL_MODEL_BYTES = 4_000_000  # below this, one sequence's step is too small to split between cores


def threads_for(batch_size: int, model_bytes: int) -> int:
    """CPU threads for a forward pass of `batch_size` rows through a model of `model_bytes` of weights: one
    for one row of a small model (splitting a step that small costs more than it saves, and a busy core
    stalls every step), else the cores free now. Measured in bench/README.md."""
    return 1 if batch_size == 1 and model_bytes < SMALL_MODEL_BYTES else free_cores()


BUSY_SAMPLE_SECONDS = 0.1  # how long the cores are watched before threads are chosen


@functools.lru_cache(maxsize=1)
def free_cores() -> int:
    """The cores this process may run on that no other work is keeping busy, when first asked (once a process):
    a thread on a core that another process also wants waits for it, and every thread of a step waits for
    the slowest, so threads beyond the free cores make each step several times slower."""
    cores = usable_cores()
    return max(1, min(len(cores), int(len(cores) - busy_cores(cores) + 0.5), cpu_quota() or len(cores)))


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def busy_cores(cores: list[int]) -> float:
    """How many of `cores` other work kept busy over BUSY_SAMPLE_SECONDS (Linux's /proc/stat), or the load
    average where that cannot be read."""
    try:
        before = _core_times(cores)
        time.sleep(BUSY_SAMPLE_SECONDS)
        after = _core_times(cores)
    except (OSError, ValueError, KeyError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = 0.0
    for core in cores:
        (idle_before, total_before), (idle_after, total_after) = before[core], after[core]
        if total_after > total_before:
            busy += 1 - (idle_after - idle_before) / (total_after - total_before)
    return busy


def _core_times(cores: list[int]) -> dict[int, tuple[int, int]]:
    """Each core's (idle, total) time so far: /proc/stat's cpuN lines, idle and iowait counted idle."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            numbers = [int(field) for field in fields[:8]]
            times[int(name[3:])] = (numbers[3] + numbers[4], sum(numbers))
    return {core: times[core] for core in cores}


def cpu_quota() -> int | None:
    """The cores a cgroup's CPU quota allows (cgroup v2's cpu.max, v1's cfs files), or None without one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text().strip()
            period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    return max(1, int(int(quota) / int(period)))
