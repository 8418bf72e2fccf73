"""Generation throughput: new tokens/s for each engine, side by side.

    pytest bench/test_generate_throughput.py

Each group is one (config, batch) pair; its engines generate 256 greedy
tokens from an 8-token prompt with random weights (speed does not depend on
what a model learned). HuggingFace transformers' GPT-2 `generate()` on the
same dimensions joins each group when transformers is installed.
"""

import warnings

import numpy as np
import pytest
import torch

from minigpt import GPTConfig, MiniGPT, Sampler
from minigpt.decoding import generate_tokens
from minigpt.generation import KVCacheEngine, RecomputeEngine

NEW_TOKENS = 256
PROMPT = list(range(1, 9))
CONFIGS = {"default": GPTConfig(vocab_size=65),  # block 128: the policy past the block size is exercised
           "block256": GPTConfig(vocab_size=65, block_size=256)}
ENGINES = {"no-cache": RecomputeEngine, "kv-cache": KVCacheEngine}


def model_for(config):
    torch.manual_seed(0)
    return MiniGPT(config).eval()


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("engine_name", list(ENGINES))
def test_generate(benchmark, record_throughput, engine_name, config_name, batch):
    benchmark.group = f"generate {config_name} batch {batch}"
    engine = ENGINES[engine_name](model_for(CONFIGS[config_name]))

    def run():
        return sum(len(ids) for ids in generate_tokens(engine, PROMPT, NEW_TOKENS, Sampler(temperature=0), batch))

    produced = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert produced == batch * NEW_TOKENS
    record_throughput(benchmark, engine_name, batch * NEW_TOKENS)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_generate_hf_gpt2_peer(benchmark, record_throughput, config_name, batch):
    transformers = pytest.importorskip("transformers", reason="peer baseline: pip install transformers")
    warnings.filterwarnings("ignore")
    benchmark.group = f"generate {config_name} batch {batch}"
    config = CONFIGS[config_name]
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=max(config.block_size, len(PROMPT) + NEW_TOKENS),
        n_embd=config.embed_dim, n_layer=config.num_layers, n_head=config.num_heads,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
    ids = torch.tensor(np.tile(PROMPT, (batch, 1)))

    @torch.inference_mode()
    def run():
        return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    out = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert out.shape == (batch, len(PROMPT) + NEW_TOKENS)
    record_throughput(benchmark, "hf-gpt2", batch * NEW_TOKENS)
