"""The one training path: every way of training a MiniGPT goes through `train`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from minigpt import distributed
from minigpt.checkpoint import Checkpoint, load_checkpoint, read_metadata, save_checkpoint, warm_start
from minigpt.config import GPTConfig, TrainConfig
from minigpt.data import Corpus
from minigpt.encoded import EncodedCorpus
from minigpt.errors import ConfigError, DataError, MiniGPTError
from minigpt.generation import generate
from minigpt.model import MiniGPT
from minigpt.paths import check_output_file
from minigpt.tokenizer import CharTokenizer

LN2 = math.log(2)


@dataclass
class TrainResult:
    model: MiniGPT
    tokenizer: CharTokenizer
    history: list[dict] = field(default_factory=list)  # one record per step, eval numbers where evaluated
    tokens_per_s: float = 0.0
    wall_s: float = 0.0


def resolve_device(name: str) -> torch.device:
    if not (name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def split_ids(corpus: EncodedCorpus, chars: str, name: str, block_size: int) -> np.ndarray:
    """A split's ids in the vocabulary `chars`, long enough for one window."""
    ids = corpus.ids(chars, name)
    if len(ids) < block_size + 1:
        raise DataError(f"the {name} split has {len(ids)} characters but block_size {block_size} needs at least "
                        f"{block_size + 1}; use more data or a smaller --block_size")
    return ids


def sample_batch(ids: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of block_size + 1 tokens (read straight from a memmap): inputs, and the same shifted
    by one as targets."""
    starts = torch.randint(len(ids) - block_size, (batch_size,), generator=generator).numpy()
    windows = torch.from_numpy(ids[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
    windows = windows.to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  grad_clip: float, device: torch.device) -> float:
    """One optimizer step on a batch (model may be wrapped: DDP, torch.compile); returns the loss."""
    with autocast_for(device):
        _, loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


def check_compiler(device: torch.device) -> None:
    """torch.compile on a CPU builds C++ kernels: fail before any work when no compiler is there."""
    import shutil

    if device.type == "cpu" and not any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "c++",
                                                                       "clang++")):
        raise MiniGPTError("--compile on a CPU needs a C++ compiler (torch.compile builds its kernels with one): "
                           "install g++, or train without --compile")


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to learning_rate, then cosine decay to a tenth of it at the last step."""
    if step < config.warmup:
        return config.learning_rate * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    min_lr = config.learning_rate / 10
    return min_lr + 0.5 * (config.learning_rate - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: MiniGPT, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Decay matrices and embeddings only: shrinking biases and LayerNorm gains
    # towards zero only hurts.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.99), **fused)


def autocast_for(device: torch.device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def estimate_loss(model: MiniGPT, ids: np.ndarray, config: TrainConfig, device: torch.device) -> float:
    """Mean loss over eval_iters random batches; the same batches at every evaluation."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    was_training = model.training
    model.eval()
    losses = []
    for _ in range(config.eval_iters):
        x, y = sample_batch(ids, config.batch_size, model.config.block_size, generator, device)
        with autocast_for(device):
            losses.append(model(x, y)[1].item())
    model.train(was_training)
    return sum(losses) / len(losses)


@torch.no_grad()
def evaluate_split(model: MiniGPT, ids: np.ndarray, batch_size: int = 64) -> float:
    """Mean next-token loss (nats) over a whole split, read in consecutive block_size windows."""
    block = model.config.block_size
    device = next(model.parameters()).device
    model.eval()
    num_full = (len(ids) - 1) // block
    inputs = ids[:num_full * block].reshape(num_full, block)
    targets = ids[1:num_full * block + 1].reshape(num_full, block)
    batches = [(inputs[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, num_full, batch_size)]
    if len(ids) - 1 > num_full * block:  # the short last window
        batches.append((ids[num_full * block:-1][None], ids[num_full * block + 1:][None]))
    total = 0.0
    for x, y in batches:
        x, y = (torch.from_numpy(a.astype(np.int64)).to(device) for a in (x, y))
        with autocast_for(device):
            logits, _ = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
    return total / (len(ids) - 1)


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped training after a step; the checkpoint at `path` holds that step."""

    def __init__(self, signum: int, step: int, path: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step, self.path = signum, step, path


class NonFiniteLoss(MiniGPTError):
    """The loss became inf or NaN; nothing from that step on was saved."""


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


def step_seed(seed: int, rank: int, step: int) -> int:
    """A seed for each (process, step): batches and dropout depend on nothing but the step, so resuming
    at step N draws exactly what an uninterrupted run draws there."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % 2**63


def metrics_path_for(out: str | Path) -> Path:
    """Each checkpoint's log beside it: minigpt.safetensors -> minigpt.metrics.jsonl."""
    out = Path(out)
    return out.with_name(f"{out.stem}.metrics.jsonl")


def check_out_path(out: Path, *, force: bool, resume: Path | None) -> None:
    """Never replace an existing checkpoint unless asked to, or it is the one being resumed."""
    check_output_file(out)
    log = metrics_path_for(out)
    if log.is_dir():
        raise MiniGPTError(f"the metrics log {log} (written beside {out}) is a folder; move it away or choose "
                           "another --out")
    if force or not out.exists() or (resume is not None and out.resolve() == resume.resolve()):
        return
    try:
        what = f"a trained model (step {read_metadata(out).get('step', '?')})"
    except MiniGPTError:  # unreadable, or not a minigpt checkpoint: still not ours to overwrite
        what = "a file that is not a minigpt checkpoint"
    raise MiniGPTError(f"{out} already holds {what}; pass --force to replace it, --resume {out} to continue "
                       "training it, or choose another --out")


def check_one_start(resume, init_from) -> None:
    if resume is not None and init_from is not None:
        raise MiniGPTError("--resume continues a run, --init-from starts a new one from a checkpoint's tensors: "
                           "give one of them")


def check_resumable(checkpoint: Checkpoint, path: Path, steps: int) -> None:
    if checkpoint.optimizer_state() is None:
        raise MiniGPTError(f"{path} has no optimizer state to resume from; "
                           "resume from a checkpoint written by `minigpt train`")
    if checkpoint.step >= steps:
        raise MiniGPTError(f"{path} is at step {checkpoint.step} already; "
                           f"pass --steps greater than {checkpoint.step} to train further")


def train(corpus: Corpus | EncodedCorpus, config: TrainConfig, out: str | Path, *, progress: bool = True,
          resume: str | Path | None = None, force: bool = False,
          init_from: str | Path | Checkpoint | None = None,
          compile: bool = False,
          on_step: Callable[[dict], None] | None = None, **model_fields) -> TrainResult:
    """Train a MiniGPT on `corpus` and save it to `out` (a .safetensors checkpoint).

    `model_fields` are GPTConfig fields other than vocab_size, which the corpus
    decides. With `resume`, model, optimizer and step come from that
    checkpoint (its architecture wins over `model_fields`) and training
    continues to `config.steps`. With `init_from` (a path, or a Checkpoint
    already loaded), a new run (step 1, a fresh optimizer) starts from that
    checkpoint's tensors where they fit (`minigpt.checkpoint.warm_start`). With `compile`, the training step runs
    through torch.compile (checkpoints are saved from the model itself). Under torchrun, each process trains on its
    own batches and rank 0 alone logs, evaluates and saves. `on_step` is
    called with each step's record.
    """
    out, resume = Path(out), (Path(resume) if resume is not None else None)
    check_one_start(resume, init_from)
    check_out_path(out, force=force, resume=resume)
    group, device_name = distributed.join(config.device)
    try:
        device = resolve_device(device_name)
        if compile:
            check_compiler(device)
        result = _train(corpus, config, out, group, device, progress=progress, resume=resume,
                        init_from=init_from, compile=compile, on_step=on_step, model_fields=model_fields)
    except (TrainingInterrupted, NonFiniteLoss):  # every process stops at the same step
        distributed.leave(group)
        raise
    except BaseException:  # maybe in this process alone: waiting for the others could wait forever
        distributed.leave(group, together=False)
        raise
    distributed.leave(group)
    return result


def _train(corpus: Corpus | EncodedCorpus, config: TrainConfig, out: Path, group: distributed.ProcessGroup,
           device: torch.device, *, progress: bool, resume: Path | None,
           init_from: str | Path | Checkpoint | None,
           compile: bool, on_step: Callable[[dict], None] | None, model_fields: dict) -> TrainResult:
    # Text in memory is encoded here; a file or folder comes encoded and memory-mapped (`minigpt.encoded`).
    encoded = corpus if isinstance(corpus, EncodedCorpus) else corpus.encode()
    if resume is not None:
        checkpoint = load_checkpoint(resume)
        check_resumable(checkpoint, resume, config.steps)
        model, tokenizer, first_step = checkpoint.model, checkpoint.tokenizer, checkpoint.step + 1
        optimizer_state = checkpoint.optimizer_state()
    else:
        GPTConfig(vocab_size=1, **model_fields)  # fail on an impossible shape before touching data
        tokenizer = CharTokenizer(encoded.chars)
        torch.manual_seed(config.seed)
        model, first_step, optimizer_state = MiniGPT(GPTConfig(tokenizer.vocab_size, **model_fields)), 1, None
        if init_from is not None:
            source = init_from if isinstance(init_from, Checkpoint) else load_checkpoint(init_from)
            report = warm_start(model, tokenizer, source)
            if group.is_main:
                print(f"minigpt: {report}", file=sys.stderr)
    model_config = model.config
    chars = "".join(tokenizer.chars)
    train_ids = split_ids(encoded, chars, "train", model_config.block_size)
    valid_ids = split_ids(encoded, chars, "valid", model_config.block_size)

    model = model.to(device).train()
    optimizer = make_optimizer(model, config, device)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    trained = model  # what the loop steps: the model itself, or its DDP and torch.compile wrappers
    if group.enabled:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        trained = torch.compile(trained)

    def save(step: int) -> None:
        if group.is_main:
            save_checkpoint(out, model, tokenizer, step=step, data=corpus.source, optimizer=optimizer,
                            train_config=dataclasses.asdict(config))

    metrics_path = metrics_path_for(out)
    if group.is_main:
        if resume is None:
            metrics_path.write_text("")
        print(f"minigpt: {model.num_parameters():,} parameters, vocab {tokenizer.vocab_size}, "
              f"{len(train_ids):,} training characters from {corpus.source}, on {device}"
              + (f" x {group.world_size} processes" if group.enabled else "")
              + (f"; resuming at step {first_step}" if resume is not None else ""), file=sys.stderr)

    result = TrainResult(model, tokenizer)
    tokens_per_step = group.world_size * config.batch_size * model_config.block_size
    steps = range(first_step, config.steps + 1)
    # disable=None: tqdm draws only on a terminal, so `2> log` gets eval lines and no bar frames.
    bar = tqdm(steps, disable=None if progress and group.is_main else True, file=sys.stderr, unit="step",
               dynamic_ncols=True)
    generator = torch.Generator()
    start = time.perf_counter()
    with StopSignals() as signals:
        for step in bar:
            lr = learning_rate_at(step - 1, config)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            seed = step_seed(config.seed, group.rank, step)
            generator.manual_seed(seed)
            torch.manual_seed(seed)  # dropout
            x, y = sample_batch(train_ids, config.batch_size, model_config.block_size, generator, device)
            if compile and step == first_step:  # torch.compile builds on the first call: name a failure
                try:
                    loss_value = training_step(trained, optimizer, x, y, config.grad_clip, device)
                except Exception as exc:
                    reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                    raise MiniGPTError(f"--compile could not build the training step ({reason}); "
                                       "train without --compile") from None
            else:
                loss_value = training_step(trained, optimizer, x, y, config.grad_clip, device)
            (non_finite,) = group.any(not math.isfinite(loss_value), device=device)
            if non_finite:
                raise NonFiniteLoss(f"the loss became {loss_value} at step {step}; the last checkpoint on disk "
                                    "is left as it was: lower --learning_rate or --grad_clip and try again")
            elapsed = time.perf_counter() - start
            record = {"step": step, "tokens": step * tokens_per_step, "loss": loss_value, "lr": lr,
                      "tokens_per_s": (step - first_step + 1) * tokens_per_step / elapsed}
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
            if group.is_main and (step % config.eval_interval == 0 or step == config.steps):
                record["train_loss"] = estimate_loss(model, train_ids, config, device)
                record["val_loss"] = estimate_loss(model, valid_ids, config, device)
                record["val_bpc"] = record["val_loss"] / LN2
                bar.write(f"step {step}: train loss {record['train_loss']:.4f}, val loss "
                          f"{record['val_loss']:.4f} nats ({record['val_bpc']:.3f} bits/char)", file=sys.stderr)
                save(step)
            result.history.append(record)
            if group.is_main:
                with metrics_path.open("a") as log:
                    log.write(json.dumps(record) + "\n")
            if on_step is not None:
                on_step(record)
            (stop,) = group.any(signals.received is not None, device=device)  # all processes stop together
            if stop:
                if "val_loss" not in record:  # not saved at this step yet
                    save(step)
                bar.close()
                raise TrainingInterrupted(signals.received or signal.SIGTERM, step, out)
    bar.close()
    result.wall_s = time.perf_counter() - start
    result.tokens_per_s = len(steps) * tokens_per_step / result.wall_s
    model.eval()
    return result


def sample_after_training(result: TrainResult, length: int = 300, seed: int = 0) -> str:
    return generate(result.model, result.tokenizer, "", length, temperature=0.8, seed=seed)
