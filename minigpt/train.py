"""The one training path: every way of training a MiniGPT goes through `train`."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minigpt.checkpoint import save_checkpoint
from minigpt.config import GPTConfig, TrainConfig
from minigpt.data import Corpus
from minigpt.errors import ConfigError, DataError
from minigpt.generation import generate
from minigpt.model import MiniGPT
from minigpt.tokenizer import CharTokenizer

LN2 = math.log(2)
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    model: MiniGPT
    tokenizer: CharTokenizer
    history: list[dict] = field(default_factory=list)  # one record per step, eval numbers where evaluated
    tokens_per_s: float = 0.0
    wall_s: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def encode_split(tokenizer: CharTokenizer, text: str, name: str, block_size: int) -> torch.Tensor:
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.int32)
    if len(ids) < block_size + 1:
        raise DataError(f"the {name} split has {len(ids)} characters but block_size {block_size} needs at least "
                        f"{block_size + 1}; use more data or a smaller --block_size")
    return ids


def sample_batch(ids: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of block_size + 1 tokens: inputs and the same shifted by one as targets."""
    starts = torch.randint(len(ids) - block_size, (batch_size,), generator=generator)
    windows = ids.unfold(0, block_size + 1, 1)[starts].long().to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]


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
def estimate_loss(model: MiniGPT, ids: torch.Tensor, config: TrainConfig, device: torch.device) -> float:
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
def evaluate_split(model: MiniGPT, ids: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token loss (nats) over a whole split, read in consecutive block_size windows."""
    block = model.config.block_size
    device = next(model.parameters()).device
    model.eval()
    num_full = (len(ids) - 1) // block
    inputs = ids[:num_full * block].view(num_full, block)
    targets = ids[1:num_full * block + 1].view(num_full, block)
    batches = [(inputs[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, num_full, batch_size)]
    if len(ids) - 1 > num_full * block:  # the short last window
        batches.append((ids[num_full * block:-1][None], ids[num_full * block + 1:][None]))
    total = 0.0
    for x, y in batches:
        with autocast_for(device):
            logits, _ = model(x.long().to(device))
        total += F.cross_entropy(logits.float().flatten(0, 1), y.long().to(device).flatten(), reduction="sum").item()
    return total / (len(ids) - 1)


def train(corpus: Corpus, config: TrainConfig, out: str | Path, *, progress: bool = True,
          **model_fields) -> TrainResult:
    """Train a MiniGPT on `corpus` and save it to `out` (a .safetensors checkpoint).

    `model_fields` are GPTConfig fields other than vocab_size, which the corpus decides.
    """
    out = Path(out)
    GPTConfig(vocab_size=1, **model_fields)  # fail on an impossible shape before touching data
    tokenizer = CharTokenizer.from_text(*corpus.all_text())
    model_config = GPTConfig(vocab_size=tokenizer.vocab_size, **model_fields)
    train_ids = encode_split(tokenizer, corpus.split("train"), "train", model_config.block_size)
    valid_ids = encode_split(tokenizer, corpus.split("valid"), "valid", model_config.block_size)

    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = MiniGPT(model_config).to(device)
    optimizer = make_optimizer(model, config, device)
    batch_generator = torch.Generator().manual_seed(config.seed)
    metrics_path = out.parent / METRICS_FILE
    metrics_path.write_text("")
    print(f"minigpt: {model.num_parameters():,} parameters, vocab {tokenizer.vocab_size}, "
          f"{len(train_ids):,} training characters from {corpus.source}, on {device}", file=sys.stderr)

    result = TrainResult(model, tokenizer)
    tokens_per_step = config.batch_size * model_config.block_size
    bar = tqdm(range(1, config.steps + 1), disable=not progress, file=sys.stderr, unit="step",
               dynamic_ncols=True)
    start = time.perf_counter()
    model.train()
    for step in bar:
        lr = learning_rate_at(step - 1, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = sample_batch(train_ids, config.batch_size, model_config.block_size, batch_generator, device)
        with autocast_for(device):
            _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

        elapsed = time.perf_counter() - start
        record = {"step": step, "loss": loss.item(), "lr": lr,
                  "tokens_per_s": step * tokens_per_step / elapsed}
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
        if step % config.eval_interval == 0 or step == config.steps:
            record["train_loss"] = estimate_loss(model, train_ids, config, device)
            record["val_loss"] = estimate_loss(model, valid_ids, config, device)
            record["val_bpc"] = record["val_loss"] / LN2
            bar.write(f"step {step}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f} "
                      f"nats ({record['val_bpc']:.3f} bits/char)", file=sys.stderr)
            save_checkpoint(out, model, tokenizer, step=step, data=corpus.source)
        result.history.append(record)
        with metrics_path.open("a") as log:
            log.write(json.dumps(record) + "\n")
    bar.close()
    result.wall_s = time.perf_counter() - start
    result.tokens_per_s = config.steps * tokens_per_step / result.wall_s
    model.eval()
    return result


def sample_after_training(result: TrainResult, length: int = 300, seed: int = 0) -> str:
    return generate(result.model, result.tokenizer, "", length, temperature=0.8, seed=seed)
