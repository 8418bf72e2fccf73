"""Training throughput of the default config: one optimizer step per round.

    pytest bench/test_train_throughput.py

Reports seconds per step; tokens/s = batch_size * block_size / mean.
"""

import pytest
import torch

from minigpt import GPTConfig, MiniGPT, TrainConfig
from minigpt.train import autocast_for, make_optimizer, sample_batch

VOCAB = 103  # the offline fallback corpus's vocabulary; speed barely depends on it


@pytest.mark.benchmark(group="train-step")
@pytest.mark.parametrize("batch_size", [8, 32])
def test_train_step_default_config(benchmark, record_throughput, batch_size):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB)
    train_config = TrainConfig(batch_size=batch_size, device="cpu")
    model = MiniGPT(config).train()
    device = torch.device("cpu")
    optimizer = make_optimizer(model, train_config, device)
    ids = torch.randint(0, VOCAB, (100_000,), dtype=torch.int32)
    generator = torch.Generator().manual_seed(0)

    def step():
        x, y = sample_batch(ids, batch_size, config.block_size, generator, device)
        with autocast_for(device):
            _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
        optimizer.step()
        return loss.item()

    step()  # warm-up: first-call allocations stay out of the numbers
    loss = benchmark(step)
    record_throughput(benchmark, f"batch {batch_size}", batch_size * config.block_size)
    assert 0 < loss < 10
