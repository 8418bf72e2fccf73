"""Generation throughput: new tokens/s for each engine, side by side.

    pytest bench/test_generate_throughput.py

Each group is one (config, batch) pair; its engines generate 256 greedy
tokens from an 8-token prompt with random weights (speed does not depend on
what a model learned): PyTorch recomputing the context, PyTorch with the
KV-cache, onnxruntime fp32 and int8. HuggingFace transformers' GPT-2
`generate()` on the same dimensions joins each group when transformers is
installed.
"""

import warnings

import numpy as np
import pytest
import torch

from minigpt import CharTokenizer, GPTConfig, MiniGPT, Sampler, save_checkpoint
from minigpt.decoding import generate_tokens
from minigpt.generation import KVCacheEngine, RecomputeEngine

NEW_TOKENS = 256
PROMPT = list(range(1, 9))
CONFIGS = {"default": GPTConfig(vocab_size=65),  # block 128: the policy past the block size is exercised
           "block256": GPTConfig(vocab_size=65, block_size=256),
           "large": GPTConfig(vocab_size=65, block_size=256, embed_dim=384, num_heads=6, num_layers=6)}
ENGINES = ["no-cache", "kv-cache", "onnx-fp32", "onnx-int8"]
# No-cache on the large config would take minutes per round; the smaller configs make that point.
PAIRS = [(engine, config) for config in CONFIGS for engine in ENGINES if (engine, config) != ("no-cache", "large")]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """engine name, config name -> a fresh engine; each config exported to ONNX once."""
    from minigpt.export.onnx_engine import OnnxEngine
    from minigpt.export.onnx_export import export_onnx

    models, graphs = {}, {}

    def make(engine_name, config_name):
        if config_name not in models:
            torch.manual_seed(0)
            models[config_name] = MiniGPT(CONFIGS[config_name]).eval()
        model = models[config_name]
        if engine_name == "no-cache":
            return RecomputeEngine(model)
        if engine_name == "kv-cache":
            return KVCacheEngine(model)
        key = (config_name, engine_name)
        if key not in graphs:
            folder = tmp_path_factory.mktemp(config_name)
            checkpoint = folder / "model.safetensors"
            save_checkpoint(checkpoint, model, CharTokenizer(map(chr, range(32, 32 + 65))))
            graphs[key] = folder / f"{engine_name}.onnx"
            export_onnx(checkpoint, graphs[key], quantize="int8" if engine_name == "onnx-int8" else None,
                        verify=False)
        return OnnxEngine(graphs[key])

    return make


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("engine_name,config_name", PAIRS)
def test_generate(benchmark, record_throughput, engines, engine_name, config_name, batch):
    benchmark.group = f"generate {config_name} batch {batch}"
    engine = engines(engine_name, config_name)

    def run():
        return sum(len(ids) for ids in generate_tokens(engine, PROMPT, NEW_TOKENS, Sampler(temperature=0), batch))

    # Fast engines finish a round in a fraction of a second: more rounds steady their median.
    produced = benchmark.pedantic(run, rounds=3 if engine_name == "no-cache" else 9, warmup_rounds=1)
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

    out = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    assert out.shape == (batch, len(PROMPT) + NEW_TOKENS)
    record_throughput(benchmark, "hf-gpt2", batch * NEW_TOKENS)
