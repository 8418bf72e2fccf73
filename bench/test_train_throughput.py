"""Training throughput: one optimizer step per round, eager and through torch.compile.

    pytest bench/test_train_throughput.py

Reports seconds per step; tokens/s = batch_size * block_size / median.
"""

import pytest
import torch

from minigpt import GPTConfig, MiniGPT, TrainConfig
from minigpt.training import make_optimizer, sample_batch, training_step

VOCAB = 103  # the offline fallback corpus's vocabulary; speed barely depends on it


CONFIGS = {"default": (GPTConfig(vocab_size=VOCAB), 32),  # the nanoGPT Tiny Shakespeare CPU recipe:
           "shakespeare": (GPTConfig(vocab_size=65, num_layers=4, embed_dim=128, block_size=64), 12)}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_train_step(benchmark, record_throughput, config_name, compiled):
    """The training loop's own step, eager or through torch.compile (`train --compile`); the first step's time
    (with the compilation) is in extra_info as `first_step_s`."""
    import time

    config, batch_size = CONFIGS[config_name]
    torch.manual_seed(0)
    train_config = TrainConfig(batch_size=batch_size, device="cpu")
    model = MiniGPT(config).train()
    device = torch.device("cpu")
    optimizer = make_optimizer(model, train_config, device)
    trained = torch.compile(model) if compiled else model
    ids = torch.randint(0, config.vocab_size, (100_000,), dtype=torch.int32).numpy()
    generator = torch.Generator().manual_seed(0)

    def step():
        x, y = sample_batch(ids, batch_size, config.block_size, generator, device)
        return training_step(trained, optimizer, x, y, train_config.grad_clip, device)

    benchmark.group = f"train-step {config_name}"
    start = time.perf_counter()
    step()  # warm-up: first-call allocations, and the compilation, stay out of the numbers
    benchmark.extra_info["first_step_s"] = time.perf_counter() - start
    loss = benchmark(step)
    record_throughput(benchmark, "compiled" if compiled else "eager", batch_size * config.block_size)
    assert 0 < loss < 10
