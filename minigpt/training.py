"""Training a MiniGPT: batches, the step, the learning-rate schedule, evaluation and saving, in one loop.

`minigpt.train` plans a run (settings checked, data read, model built or
restored) and calls `train_loop`; what a full run adds around it (saving,
several processes, Ctrl-C) comes in through the plan's `Run`
(`minigpt.training_plan`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from minigpt.config import TrainConfig
from minigpt.model import MiniGPT
from minigpt.training_plan import Run, TrainingPlan, TrainResult

LN2 = math.log(2)


def sample_batch(ids: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of block_size + 1 tokens (from a memmap): the inputs, and the targets one further on."""
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
    # Decay matrices and embeddings only: shrinking biases and LayerNorm gains towards zero only hurts.
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


def step_seed(seed: int, rank: int, step: int) -> int:
    """A seed for each (process, step): resuming at step N draws what an uninterrupted run draws there."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % 2**63


def train_loop(plan: TrainingPlan, make_run=Run, progress: bool = True, on_step=None) -> TrainResult:
    """Train plan.model to plan.config.steps: a step, a check, an evaluation and a save every eval_interval."""
    config, device, block = plan.config, plan.device, plan.model.config.block_size
    train_ids, valid_ids = plan.split("train"), plan.split("valid")
    model = plan.model.to(device).train()
    optimizer = make_optimizer(model, config, device)
    if plan.optimizer_state is not None:
        optimizer.load_state_dict(plan.optimizer_state)
    run = make_run(plan, model, optimizer)
    step_model, result = run.step_model(), TrainResult(model, plan.tokenizer)
    tokens_per_step = run.world_size * config.batch_size * block
    steps = range(plan.first_step, config.steps + 1)
    per_char = len(plan.corpus.split("valid")) / len(valid_ids)  # 1 for characters; a subword spells several
    # disable=None: tqdm draws only on a terminal, so `2> log` gets eval lines and no bar frames.
    bar = tqdm(steps, disable=None if progress and run.is_main else True, file=sys.stderr, unit="step",
               dynamic_ncols=True)
    generator, start = torch.Generator(), time.perf_counter()
    with contextlib.closing(run), contextlib.closing(bar):
        for step in bar:
            lr = learning_rate_at(step - 1, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            generator.manual_seed(seed := step_seed(config.seed, run.rank, step))
            torch.manual_seed(seed)  # dropout
            x, y = sample_batch(train_ids, config.batch_size, block, generator, device)
            loss = training_step(step_model, optimizer, x, y, config.grad_clip, device)
            run.check_finite(loss, step)
            record = {"step": step, "tokens": step * tokens_per_step, "loss": loss, "lr": lr,
                      "seconds": (seconds := time.perf_counter() - start),  # training time, this process
                      "tokens_per_s": (step - plan.first_step + 1) * tokens_per_step / seconds}
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
            saved = run.is_main and (step % config.eval_interval == 0 or step == config.steps)
            if saved:
                record.update(evaluate(model, train_ids, valid_ids, config, device, bar, step, per_char))
                run.save(step, final=step == config.steps)
            result.history.append(record)
            if on_step is not None:
                on_step(record)
            run.after_step(record, saved)
    result.wall_s = time.perf_counter() - start
    result.tokens_per_s = len(steps) * tokens_per_step / result.wall_s
    model.eval()
    return result


def evaluate(model: MiniGPT, train_ids: np.ndarray, valid_ids: np.ndarray, config: TrainConfig,
             device: torch.device, bar, step: int, characters_per_token: float) -> dict:
    """Train and validation loss (a token) on the same fixed batches each time, and bits a character."""
    numbers = {"train_loss": estimate_loss(model, train_ids, config, device),
               "val_loss": estimate_loss(model, valid_ids, config, device)}
    numbers["val_bpc"] = numbers["val_loss"] / LN2 / characters_per_token
    bar.write(f"step {step}: train loss {numbers['train_loss']:.4f}, val loss {numbers['val_loss']:.4f} nats "
              f"({numbers['val_bpc']:.3f} bits/char)", file=sys.stderr)
    return numbers
