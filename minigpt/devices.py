"""Where code runs: the one place that reads a device name or a thread count (torch is imported only to
resolve a device, so the onnxruntime path and the config checks stay torch-free)."""

from __future__ import annotations

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


def threads_for(batch_size: int, model_bytes: int) -> int | None:
    """CPU threads for a forward pass of `batch_size` rows through a model of `model_bytes` of weights: one
    for one row of a small model (splitting a step that small costs more than it saves, and a busy core
    stalls every step), else None (the library's own choice: every core). Measured in bench/README.md."""
    return 1 if batch_size == 1 and model_bytes < SMALL_MODEL_BYTES else None
