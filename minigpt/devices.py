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
