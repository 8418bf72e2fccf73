"""The one training path: every way of training a MiniGPT goes through `plan_training`, then `run_training`.

A plan checks every setting (cheapest first, before any data is read),
loads the data once and builds or restores the model; the run only trains:
a step, the checks every process agrees on, an evaluation and a save every
eval_interval steps, one metrics record a step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from minigpt import distributed
from minigpt.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, warm_start
from minigpt.config import GPTConfig, TrainConfig
from minigpt.data import DataSource, load_corpus, load_recorded_corpus
from minigpt.decoding import EMPTY_PROMPT
from minigpt.devices import check_memory, resolve_device
from minigpt.drafts import CANDIDATES, NGramDraft
from minigpt.encoded import EncodedCorpus
from minigpt.errors import DataError, MiniGPTError
from minigpt.generation import KVCacheEngine, generate
from minigpt.model import MiniGPT
from minigpt.scoring import score
from minigpt.tokenizer import CharTokenizer
from minigpt.training_checks import (NonFiniteLoss, OutputLock, StopSignals, TrainingInterrupted, check_compiler,
                                     check_one_start, check_out_path, check_resumable, flag_list, metrics_path_for,
                                     resumed_settings)

LN2 = math.log(2)


@dataclass
class TrainResult:
    model: MiniGPT
    tokenizer: CharTokenizer
    history: list[dict] = field(default_factory=list)  # one record per step, eval numbers where evaluated
    tokens_per_s: float = 0.0
    wall_s: float = 0.0


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


def evaluate_split(model: MiniGPT, ids: np.ndarray, batch_size: int = 64) -> float:
    """Mean next-token loss (nats) over a whole split, read in consecutive block_size windows, `batch_size` of
    them a pass: the scoring the server's `echo` and lm-eval share (`minigpt.scoring`)."""
    model.eval()
    engine = KVCacheEngine(model)
    engine.start(batch_size)
    return -score(engine, ids, rows=batch_size).total / (len(ids) - 1)


def step_seed(seed: int, rank: int, step: int) -> int:
    """A seed for each (process, step): batches and dropout depend on nothing but the step, so resuming
    at step N draws exactly what an uninterrupted run draws there."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % 2**63


@dataclass
class TrainingPlan:
    """A run, checked and loaded: every flag vetted, the data read, the model built or restored. Nothing
    about the request can fail once a plan exists; `run_training` only trains."""

    config: TrainConfig
    out: Path
    device: torch.device
    corpus: EncodedCorpus
    model: MiniGPT
    tokenizer: CharTokenizer
    first_step: int = 1
    optimizer_state: dict | None = None
    resume: Path | None = None
    compile: bool = False
    notes: list[str] = field(default_factory=list)  # said once before training starts

    def split(self, name: str) -> np.ndarray:
        return split_ids(self.corpus, "".join(self.tokenizer.chars), name, self.model.config.block_size)


def _input_paths(data, init_from, cache_dir) -> list[tuple[str, Path]]:
    """What a run reads from files, as (flag, path): an --out must be none of them."""
    paths = []
    if isinstance(data, (str, os.PathLike)) and DataSource.parse(data).kind == "path":
        paths.append(("--data", Path(data)))
    elif isinstance(data, DataSource) and data.kind == "path":
        paths.append(("--data", Path(data.name)))
    if init_from is not None:
        paths.append(("--init-from", Path(init_from.path if isinstance(init_from, Checkpoint) else init_from)))
    if cache_dir is not None:
        paths.append(("--cache-dir", Path(cache_dir)))
    return paths


def plan_training(out: str | Path, *, data: EncodedCorpus | DataSource | str | None = None,
                  config: TrainConfig | dict | None = None, resume: str | Path | None = None,
                  init_from: str | Path | Checkpoint | None = None, force: bool = False, compile: bool = False,
                  cache_dir: str | Path | None = None, text_column: str = "text", **model_fields) -> TrainingPlan:
    """Check everything that needs no data (cheapest first), then read the data and build the model.

    `config`: a TrainConfig, or the settings given on the command line as a dict (with `resume` they
    override the checkpoint's stored settings, and the change is said once). `data`: a corpus already
    loaded, or what `minigpt.data.load_corpus` reads (None: a resumed run's own data, else WikiText-2).
    """
    out, resume = Path(out), (Path(resume) if resume is not None else None)
    check_one_start(resume, init_from)
    if init_from is not None and not isinstance(init_from, Checkpoint):
        init_from = load_checkpoint(init_from)  # vetted before the data loads
    resumed = load_checkpoint(resume) if resume is not None else None
    notes = []
    if resumed is None:
        GPTConfig(vocab_size=1, **model_fields)  # an impossible shape fails here
        config = config if isinstance(config, TrainConfig) else TrainConfig(**(config or {}))
    else:
        if not isinstance(config, TrainConfig):
            config, note = resumed_settings(resume, resumed.metadata, config or {})
            notes += [note] if note else []
        if model_fields:
            notes.append(f"--resume keeps the checkpoint's architecture; ignoring {flag_list(model_fields)}")
    device = resolve_device(config.device)
    if compile:
        check_compiler(device)
    check_out_path(out, force=force, resume=resume, inputs=_input_paths(data, init_from, cache_dir))
    if resumed is not None:
        check_resumable(resumed, resume, config.steps)
    if isinstance(data, EncodedCorpus):
        corpus = data
    elif data is None and resumed is not None:
        corpus = load_recorded_corpus(resumed.metadata, cache_dir)
    else:
        corpus = load_corpus(data, cache_dir, text_column)
    if resumed is not None:
        return TrainingPlan(config, out, device, corpus, resumed.model, resumed.tokenizer, resumed.step + 1,
                            resumed.optimizer_state(), resume, compile, notes)
    tokenizer = CharTokenizer(corpus.chars)
    architecture = GPTConfig(tokenizer.vocab_size, **model_fields)
    check_memory(16 * architecture.parameters, f"training a model of {architecture.parameters:,} parameters "
                 "(weights, gradients and AdamW's two moments, 4 bytes each)", "lower --embed-dim or --num-layers",
                 device)
    torch.manual_seed(config.seed)
    model = MiniGPT(architecture)
    if init_from is not None:
        notes.append(str(warm_start(model, tokenizer, init_from)))
    return TrainingPlan(config, out, device, corpus, model, tokenizer, compile=compile, notes=notes)


def train(corpus: EncodedCorpus | DataSource | str | None, config: TrainConfig, out: str | Path, *,
          progress: bool = True, resume: str | Path | None = None, force: bool = False,
          init_from: str | Path | Checkpoint | None = None, compile: bool = False,
          on_step: Callable[[dict], None] | None = None, **model_fields) -> TrainResult:
    """Train a MiniGPT on `corpus` and save it to `out` (a .safetensors checkpoint): `plan_training`, then
    `run_training`.

    `model_fields` are GPTConfig fields other than vocab_size, which the corpus
    decides. With `resume`, model, optimizer and step come from that
    checkpoint (its architecture wins over `model_fields`) and training
    continues to `config.steps`. With `init_from` (a path, or a Checkpoint
    already loaded), a new run (step 1, a fresh optimizer) starts from that
    checkpoint's tensors where they fit (`minigpt.checkpoint.warm_start`).
    With `compile`, the training step runs through torch.compile (checkpoints
    are saved from the model itself). Under torchrun, each process trains on
    its own batches and rank 0 alone logs, evaluates and saves. `on_step` is
    called with each step's record.
    """
    plan = plan_training(out, data=corpus, config=config, resume=resume, init_from=init_from, force=force,
                         compile=compile, **model_fields)
    return run_training(plan, progress=progress, on_step=on_step)


def run_training(plan: TrainingPlan, *, progress: bool = True,
                 on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train to plan.config.steps; under torchrun every process runs this and they stop together."""
    group, device_name = distributed.join(plan.config.device)
    lock = None
    try:
        lock = OutputLock(plan.out) if group.is_main else None  # one writer per checkpoint
        if group.enabled:
            plan.device = resolve_device(device_name)
        result = _train(plan, group, progress, on_step)
    except (TrainingInterrupted, NonFiniteLoss):  # every process stops at the same step
        distributed.leave(group)
        raise
    except BaseException:  # maybe in this process alone: waiting for the others could wait forever
        distributed.leave(group, together=False)
        raise
    finally:
        if lock is not None:
            lock.release()
    distributed.leave(group)
    return result


# The finished model reads this much of the training text for its draft table (~1.2 s a 100,000 characters for
# the default model on 2 CPU cores): 50,000 already guess as well as 418,000 (tokens a verify step, bench).
DISTILLED_CHARACTERS = 200_000
PICK_WINDOWS = 64  # block-long windows a forward pass of `model_picks` reads


@torch.inference_mode()
def model_picks(model: MiniGPT, ids: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the model says after each character of `ids`, reading it in block-long windows: (picks, likely,
    chances), where for j >= 1 picks[j] is its greedy pick at j from the text before (within its window),
    likely[j] its CANDIDATES likeliest characters there and chances[j] their probabilities (row 0: ids[0],
    certain). Cut to the whole windows (and one), or ids itself, certain, when it is shorter than a block.

    Its n-gram draft table counts these, not the text's characters: a draft is right when it guesses what
    the model will say, and the model's greedy text drifts from the corpus (default model: the table of its
    picks guesses 6.5 tokens a verify step where the text's guesses 3.8; sampling from its probabilities
    instead of its picks, 1.53x plain sampling against 1.27x)."""
    block, text = model.config.block_size, np.asarray(ids, dtype=np.int64)
    windows = (len(text) - 1) // block if len(text) > block else 0
    picks = text[:windows * block + 1].copy() if windows else text.copy()
    width = min(CANDIDATES, model.config.vocab_size)
    likely = np.zeros((len(picks), width), dtype=np.int64)
    chances = np.zeros((len(picks), width), dtype=np.float32)
    likely[:, 0], chances[:, 0] = picks, 1.0  # what the model read no window for: the text, certain
    training = model.training
    model.eval()
    try:
        for first in range(0, windows, PICK_WINDOWS):
            count = min(PICK_WINDOWS, windows - first)
            read = torch.from_numpy(text[first * block:(first + count) * block].reshape(count, block))
            logits = model(read.to(device))[0].reshape(count * block, -1).float()
            top = torch.softmax(logits, dim=-1).topk(width, dim=-1)
            said = slice(first * block + 1, (first + count) * block + 1)
            picks[said] = logits.argmax(-1).cpu().numpy()
            likely[said], chances[said] = top.indices.cpu().numpy(), top.values.cpu().numpy()
    finally:
        model.train(training)
    return picks, likely, chances


class Run:
    """What a run writes as it goes: the checkpoint and one metrics record a step (rank 0 alone)."""

    def __init__(self, plan: TrainingPlan, model: MiniGPT, optimizer, is_main: bool):
        self.plan, self.model, self.optimizer, self.is_main = plan, model, optimizer, is_main
        self.log, self.draft = None, None
        if is_main:
            self.log = metrics_path_for(plan.out).open("a" if plan.resume is not None else "w")

    def save(self, step: int, final: bool = False) -> None:
        """Write the checkpoint; the n-gram draft table goes with it: the text's own until the last step,
        then the finished model's (`model_picks`)."""
        if self.is_main:
            plan = self.plan
            if final:
                ids = plan.split("train")[:DISTILLED_CHARACTERS]
                picks, likely, chances = model_picks(self.model, ids, plan.device)
                self.draft = NGramDraft.build(ids[:len(picks)], plan.tokenizer.vocab_size, picks=picks,
                                              likely=(likely, chances))
            elif self.draft is None:  # made once, at the first save: what speculative decoding guesses from
                self.draft = NGramDraft.build(plan.split("train"), plan.tokenizer.vocab_size)
            save_checkpoint(plan.out, self.model, plan.tokenizer, step=step, data=plan.corpus.source, draft=self.draft,
                            optimizer=self.optimizer, train_config=dataclasses.asdict(plan.config))

    def record(self, record: dict) -> None:
        if self.log is not None:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()  # a log read while training runs (or after a crash) is whole up to its last line

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def _train(plan: TrainingPlan, group: distributed.ProcessGroup, progress: bool,
           on_step: Callable[[dict], None] | None) -> TrainResult:
    config, device, block = plan.config, plan.device, plan.model.config.block_size
    train_ids, valid_ids = plan.split("train"), plan.split("valid")
    model = plan.model.to(device).train()
    optimizer = make_optimizer(model, config, device)
    if plan.optimizer_state is not None:
        optimizer.load_state_dict(plan.optimizer_state)
    step_model = wrap_for_training(model, group, device, plan.compile)
    run = Run(plan, model, optimizer, group.is_main)
    if group.is_main:
        say_start(plan, len(train_ids), group)
    result = TrainResult(model, plan.tokenizer)
    tokens_per_step = group.world_size * config.batch_size * block
    steps = range(plan.first_step, config.steps + 1)
    # disable=None: tqdm draws only on a terminal, so `2> log` gets eval lines and no bar frames.
    bar = tqdm(steps, disable=None if progress and group.is_main else True, file=sys.stderr, unit="step",
               dynamic_ncols=True)
    generator = torch.Generator()
    start = time.perf_counter()
    with StopSignals() as signals, contextlib.closing(run), contextlib.closing(bar):
        for step in bar:
            lr = set_learning_rate(optimizer, step, config)
            generator.manual_seed(seed := step_seed(config.seed, group.rank, step))
            torch.manual_seed(seed)  # dropout
            x, y = sample_batch(train_ids, config.batch_size, block, generator, device)
            loss = first_step(step_model, optimizer, x, y, config, device) if step == plan.first_step and \
                plan.compile else training_step(step_model, optimizer, x, y, config.grad_clip, device)
            check_finite(loss, step, group, device, config, plan.out)
            record = {"step": step, "tokens": step * tokens_per_step, "loss": loss, "lr": lr,
                      "tokens_per_s": (step - plan.first_step + 1) * tokens_per_step / (time.perf_counter() - start)}
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
            saved = group.is_main and (step % config.eval_interval == 0 or step == config.steps)
            if saved:
                record.update(evaluate(model, train_ids, valid_ids, config, device, bar, step))
                run.save(step, final=step == config.steps)
            result.history.append(record)
            run.record(record)
            if on_step is not None:
                on_step(record)
            (stop,) = group.any(signals.received is not None, device=device)  # all processes stop together
            if stop:
                if not saved:
                    run.save(step)
                raise TrainingInterrupted(signals.received or signal.SIGTERM, step, plan.out)
    result.wall_s = time.perf_counter() - start
    result.tokens_per_s = len(steps) * tokens_per_step / result.wall_s
    model.eval()
    return result


def wrap_for_training(model: MiniGPT, group: distributed.ProcessGroup, device: torch.device,
                      compile: bool) -> torch.nn.Module:
    """What the loop steps: the model itself, or its DDP and torch.compile wrappers (saved from the model)."""
    if group.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if compile else model


def say_start(plan: TrainingPlan, train_characters: int, group: distributed.ProcessGroup) -> None:
    for note in plan.notes:
        print(f"minigpt: {note}", file=sys.stderr)
    print(f"minigpt: {plan.model.num_parameters():,} parameters, vocab {plan.tokenizer.vocab_size}, "
          f"{train_characters:,} training characters from {plan.corpus.source}, on {plan.device}"
          + (f" x {group.world_size} processes" if group.enabled else "")
          + (f"; resuming at step {plan.first_step}" if plan.resume is not None else ""), file=sys.stderr)


def set_learning_rate(optimizer: torch.optim.Optimizer, step: int, config: TrainConfig) -> float:
    lr = learning_rate_at(step - 1, config)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    return lr


def first_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               config: TrainConfig, device: torch.device) -> float:
    """The first compiled step, where torch.compile builds: a failure is named in one line."""
    try:
        return training_step(model, optimizer, x, y, config.grad_clip, device)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise MiniGPTError(f"--compile could not build the training step ({reason}); "
                           "train without --compile") from None


def check_finite(loss: float, step: int, group: distributed.ProcessGroup, device: torch.device,
                 config: TrainConfig, out: Path) -> None:
    (non_finite,) = group.any(not math.isfinite(loss), device=device)  # on any process: all stop
    if non_finite:
        kept = f"the checkpoint {out} is left as it was" if out.exists() else "nothing was saved"
        advice = "lower --learning-rate" + (" or --grad-clip" if config.grad_clip else ", or clip the gradient "
                                                                                  "with --grad-clip 1")
        raise NonFiniteLoss(f"the loss became {loss} at step {step}; {kept}: {advice} and try again")


def evaluate(model: MiniGPT, train_ids: np.ndarray, valid_ids: np.ndarray, config: TrainConfig,
             device: torch.device, bar, step: int) -> dict:
    """Train and validation loss on the same fixed batches each time, said in one line."""
    numbers = {"train_loss": estimate_loss(model, train_ids, config, device),
               "val_loss": estimate_loss(model, valid_ids, config, device)}
    numbers["val_bpc"] = numbers["val_loss"] / LN2
    bar.write(f"step {step}: train loss {numbers['train_loss']:.4f}, val loss {numbers['val_loss']:.4f} nats "
              f"({numbers['val_bpc']:.3f} bits/char)", file=sys.stderr)
    return numbers


def sample_after_training(result: TrainResult, length: int = 300, seed: int = 0) -> str:
    """A sample from the start of a line, or from the vocabulary's first character when the text had no
    newline (the model is saved by then: a sample must not turn a finished run into an error)."""
    tokenizer = result.tokenizer
    start = "" if EMPTY_PROMPT in tokenizer.chars else tokenizer.chars[0]
    return generate(result.model, tokenizer, start, length, temperature=0.8, seed=seed)
