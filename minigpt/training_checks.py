"""What a training run checks before it starts, and how it stops.

Kept apart from `minigpt.train` so the plan reads on its own: an output is
never a file it must not replace, a resume has something to resume, a
compile has a compiler; Ctrl-C or SIGTERM ends a run after a step, saved.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from pathlib import Path

import torch

from minigpt.checkpoint import Checkpoint, read_metadata
from minigpt.config import GPTConfig, TrainConfig
from minigpt.devices import check_memory
from minigpt.errors import CheckpointError, MiniGPTError
from minigpt.paths import check_output_file, check_replaceable, same_path, temporaries_of


def parameter_count(config: GPTConfig) -> int:
    """How many numbers a model of `config` holds (the head is tied to the token embedding), known before a byte
    of it is allocated."""
    width, hidden = config.embed_dim, config.mlp_ratio * config.embed_dim
    block = 4 * width + (3 * width * width + 3 * width) + (width * width + width) + 2 * width * hidden \
        + hidden + width  # two LayerNorms, attention in and out, the MLP
    return (config.vocab_size + config.block_size) * width + config.num_layers * block + 2 * width


def check_model_fits(config: GPTConfig, device: torch.device) -> None:
    parameters = parameter_count(config)
    check_memory(16 * parameters, f"training a model of {parameters:,} parameters (weights, gradients and AdamW's "
                 "two moments, 4 bytes each)", "lower --embed-dim or --num-layers", device)


def check_compiler(device: torch.device) -> None:
    """torch.compile on a CPU builds C++ kernels: fail before any work when no compiler is there."""
    import shutil

    if device.type == "cpu" and not any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "c++",
                                                                       "clang++")):
        raise MiniGPTError("--compile on a CPU needs a C++ compiler (torch.compile builds its kernels with one): "
                           "install g++, or train without --compile")

class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped training after a step; the checkpoint at `path` holds that step."""

    def __init__(self, signum: int, step: int, path: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step, self.path = signum, step, path


class StopSignals:
    """Turns SIGINT and SIGTERM into a flag the loop reads between steps.

    The step in flight finishes and a checkpoint is saved before stopping;
    further signals while that happens are ignored, so the save completes.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

def metrics_path_for(out: str | Path) -> Path:
    """Each checkpoint's log beside it: minigpt.safetensors -> minigpt.metrics.jsonl."""
    out = Path(out)
    return out.with_name(f"{out.stem}.metrics.jsonl")


def check_out_path(out: Path, *, force: bool, resume: Path | None, inputs=()) -> None:
    """Never replace an existing checkpoint unless asked to, or it is the one being resumed; never write over
    one of the run's inputs (`inputs`: (flag, path) pairs), nor replace anything but a checkpoint."""
    check_output_file(out)
    log = metrics_path_for(out)
    if log.is_dir():
        raise MiniGPTError(f"the metrics log {log} (written beside {out}) is a folder; move it away or choose "
                           "another --out")
    for name, path in inputs:
        if path is not None and same_path(path, log):
            raise MiniGPTError(f"{name} {path} is the metrics log this run writes beside {out}; choose another "
                               "--out")
    if resume is not None and same_path(out, resume):
        return
    check_replaceable(out, writes="safetensors", force=True, inputs=inputs)  # an input, or another kind of file
    if out.exists() and not force:
        try:
            what = f"a trained model (step {read_metadata(out).get('step', '?')})"
        except MiniGPTError:  # unreadable, or not a minigpt checkpoint: still not ours to overwrite
            what = "a file that is not a minigpt checkpoint"
        raise MiniGPTError(f"{out} already holds {what}; pass --force to replace it, --resume {out} to continue "
                           "training it, or choose another --out")


class OutputLock:
    """One writer per checkpoint: an exclusive lock on a file beside it (.NAME.lock, holding the writer's
    process id), taken before training and removed after. The kernel drops the lock when the process ends,
    however it ends, so a lock left by a killed run is recognised as stale and taken over, and the temporary
    files its killed saves left beside the checkpoint are removed."""

    def __init__(self, out: Path):
        self.path = out.with_name(f".{out.name}.lock")
        self.file = self.path.open("a+")
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock to take
            self.release()
            return
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "?"
            self.file.close()
            raise MiniGPTError(f"another minigpt train (process {holder}) is writing {out}; wait for it to "
                               "finish, or choose another --out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        for stale in temporaries_of(out):  # a save of a killed writer; only the lock's holder writes here
            stale.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.file.closed:
            self.path.unlink(missing_ok=True)
            self.file.close()


def check_one_start(resume, init_from) -> None:
    """--resume or --init-from, each naming a file that is there, in the words of its own flag."""
    if resume is not None and init_from is not None:
        raise MiniGPTError("--resume continues a run, --init-from starts a new one from a checkpoint's tensors: "
                           "give one of them")
    for flag, path in (("--resume", resume), ("--init-from", init_from)):
        if isinstance(path, (str, os.PathLike)) and not Path(path).exists():
            raise CheckpointError(f"{flag} {path}: checkpoint not found; give a .safetensors file `minigpt train` "
                                  "saved")
    if resume is not None and Path(resume).is_dir():
        raise CheckpointError(f"--resume {resume} is a transformers directory: it keeps weights but no optimizer "
                              f"state or step to resume from; start a new run from its weights with --init-from "
                              f"{resume}")


def check_resumable(checkpoint: Checkpoint, path: Path, steps: int) -> None:
    if checkpoint.optimizer_state() is None:
        raise MiniGPTError(f"{path} has no optimizer state to resume from; "
                           "resume from a checkpoint written by `minigpt train`")
    if checkpoint.step >= steps:
        raise MiniGPTError(f"{path} is at step {checkpoint.step} already; "
                           f"pass --steps greater than {checkpoint.step} to train further")

def resumed_settings(path: Path, metadata: dict[str, str], given: dict) -> tuple[TrainConfig, str | None]:
    """A checkpoint's training settings with those `given` on top, and the line that says what changed."""
    try:
        stored = TrainConfig.from_json(metadata["train_config"]) if "train_config" in metadata else TrainConfig()
    except MiniGPTError as exc:
        raise CheckpointError(f"{path} has bad metadata: {exc}; it may be damaged: "
                              "restore it, or start a new run") from None
    changed = {name: value for name, value in given.items() if value != getattr(stored, name)}
    note = f"resuming with the checkpoint's training settings, except {flag_list(changed)}" if changed else None
    return dataclasses.replace(stored, **given), note


def flag_list(values: dict) -> str:
    return ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in values.items())
