"""Generation throughput: new tokens/s for each engine and its peers, side by side, same weights.

    pytest bench/test_generate_throughput.py
    pip install ctranslate2 transformers   # the peers; skipped with a reason without them

Each group is one (config, batch) pair; every engine continues the same
8-token prompt greedily to the end of the block (no restarts, so peers that
cannot slide past the block run the same work): PyTorch recomputing the
context, PyTorch with the KV-cache, onnxruntime fp32 and int8, CTranslate2
fp32 and int8 (converted from the model's `minigpt export --hf` directory, as
a user would), and HuggingFace `generate()` on that directory. The summary prints each engine's
ratio to CTranslate2 fp32 where it ran.

The large config also gets a `bandwidth bound` line: the rate at which this
machine can stream the model's fp32 weights from memory (a large-array read
measured in the same run), the ceiling for batch 1.
"""

import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from minigpt import CharTokenizer, GPTConfig, MiniGPT, Sampler, save_checkpoint
from minigpt.decoding import generate_rows
from minigpt.generation import KVCacheEngine, RecomputeEngine

PROMPT = list(range(1, 9))
CONFIGS = {"default": GPTConfig(vocab_size=65),  # block 128
           "long": GPTConfig(vocab_size=65, block_size=1024),
           "large": GPTConfig(vocab_size=65, block_size=256, embed_dim=384, num_heads=6, num_layers=6)}
ENGINES = ["no-cache", "kv-cache", "onnx-fp32", "onnx-int8", "ct2-fp32", "ct2-int8"]
# Recomputing 1,000 positions, or the large model, takes minutes a round: the default config makes that point.
PAIRS = [(engine, config) for config in CONFIGS for engine in ENGINES
         if engine != "no-cache" or config == "default"]


def new_tokens(config_name: str) -> int:
    return CONFIGS[config_name].block_size - len(PROMPT)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """config name -> (model, its checkpoint file): random weights, seeded, made once."""
    built = {}

    def get(config_name):
        if config_name not in built:
            torch.manual_seed(0)
            model = MiniGPT(CONFIGS[config_name]).eval()
            checkpoint = tmp_path_factory.mktemp(config_name) / "model.safetensors"
            save_checkpoint(checkpoint, model, CharTokenizer(map(chr, range(32, 32 + model.config.vocab_size))))
            built[config_name] = model, checkpoint
        return built[config_name]

    return get


@pytest.fixture(scope="module")
def engines(models, tmp_path_factory):
    """engine name, config name -> something `run_engine` can time; exports and conversions made once.

    hf-gpt2 and the CTranslate2 peers start from the model's `minigpt export --hf` directory, as a user would.
    """
    made = {}

    def make(engine_name, config_name):
        model, checkpoint = models(config_name)
        if engine_name == "no-cache":
            return RecomputeEngine(model)
        if engine_name == "kv-cache":
            return KVCacheEngine(model)
        key = (engine_name, config_name)
        if key in made:
            return made[key]
        if engine_name.startswith("onnx"):
            from minigpt.export.onnx_engine import OnnxEngine
            from minigpt.export.onnx_export import export_onnx

            path = tmp_path_factory.mktemp(config_name) / f"{engine_name}.onnx"
            export_onnx(checkpoint, path, quantize="int8" if engine_name == "onnx-int8" else None, verify=False)
            made[key] = OnnxEngine(path)
            return made[key]
        pytest.importorskip("transformers", reason="peer baseline: pip install ctranslate2 transformers")
        if ("hf", config_name) not in made:
            from minigpt.export.hf_export import export_hf

            made["hf", config_name] = tmp_path_factory.mktemp(config_name) / "hf"
            export_hf(checkpoint, made["hf", config_name], verify=False)
        hf_dir = made["hf", config_name]
        if engine_name == "hf-gpt2":
            from gpt2_peers import hf_gpt2

            made[key] = hf_gpt2(hf_dir)
        else:
            pytest.importorskip("ctranslate2", reason="peer baseline: pip install ctranslate2 transformers")
            from gpt2_peers import CTranslate2Peer

            made[key] = CTranslate2Peer(hf_dir, "float32" if engine_name == "ct2-fp32" else "int8")
        return made[key]

    return make


def run_engine(engine, batch: int, count: int) -> np.ndarray:
    """(batch, count) greedy ids from PROMPT, by a minigpt engine or a CTranslate2 peer."""
    if hasattr(engine, "greedy"):
        return engine.greedy([PROMPT] * batch, count)
    return np.stack(list(generate_rows(engine, [PROMPT] * batch, count, Sampler(temperature=0))), axis=1)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("engine_name,config_name", PAIRS)
def test_generate(benchmark, record_throughput, engines, engine_name, config_name, batch):
    benchmark.group = f"generate {config_name} batch {batch}"
    engine = engines(engine_name, config_name)
    count = new_tokens(config_name)
    # Fast engines finish a round in a fraction of a second: more rounds steady their median.
    rounds = 3 if engine_name == "no-cache" or config_name != "default" else 9
    ids = benchmark.pedantic(run_engine, args=(engine, batch, count), rounds=rounds, warmup_rounds=1)
    assert ids.shape == (batch, count)
    assert (ids == ids[0]).all()  # every row has the same prompt, so the same greedy text
    record_throughput(benchmark, engine_name, batch * count)


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_greedy_text_equals_ctranslate2(engines, config_name):
    """The fastest engines and CTranslate2 write the same greedy text from the same weights."""
    ours = run_engine(engines("onnx-fp32", config_name), 1, new_tokens(config_name))
    theirs = run_engine(engines("ct2-fp32", config_name), 1, new_tokens(config_name))
    agree = int((ours == theirs).sum())
    assert agree == ours.size, f"{agree}/{ours.size} greedy tokens agree"


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_generate_hf_gpt2_peer(benchmark, record_throughput, engines, config_name, batch):
    warnings.filterwarnings("ignore")
    benchmark.group = f"generate {config_name} batch {batch}"
    model = engines("hf-gpt2", config_name)
    count = new_tokens(config_name)
    ids = torch.tensor([PROMPT] * batch)

    @torch.inference_mode()
    def run():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, min_new_tokens=count,
                              do_sample=False, pad_token_id=0)

    out = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert out.shape == (batch, len(PROMPT) + count)
    record_throughput(benchmark, "hf-gpt2", batch * count)


def test_memory_bandwidth_bound(benchmark, record_throughput, models):
    """Stream a 512 MB array (far past any cache) once a round on every core, as the engines run the large
    model: GB/s, and the tokens/s that allows when each token reads all fp32 weights once (batch 1)."""
    benchmark.group = "generate large batch 1"
    data = np.ones(128 * 2**20, dtype=np.float32)
    parts = np.array_split(data, os.cpu_count() or 1)
    with ThreadPoolExecutor(len(parts)) as pool:  # numpy releases the GIL while it sums
        total = benchmark.pedantic(lambda: sum(pool.map(np.sum, parts)), rounds=5, warmup_rounds=1)
    assert total == data.size  # every element was read
    weight_bytes = 4 * sum(p.numel() for p in models("large")[0].parameters())
    if benchmark.stats:
        benchmark.extra_info["GB/s"] = data.nbytes / benchmark.stats["median"] / 1e9
        benchmark.extra_info["weights MB"] = weight_bytes / 1e6
    record_throughput(benchmark, "bandwidth bound", data.nbytes / weight_bytes)


def test_decode_step_cost_grows_far_slower_than_the_context(benchmark, engines):
    """onnxruntime decode step at context 1,000 against context 100 (batch 1, long config): with the cache a
    step computes one position and only its attention reads the longer past, so 10x the context costs far
    less than 10x the step (recomputing the context would)."""
    engine = engines("onnx-fp32", "long")
    benchmark.group = "decode step by context"
    step_ids = np.array([[1]])

    def step_time(context, repeats=300):
        engine.start(1)
        engine.extend(np.ones((1, context), dtype=np.int64), np.array([0]))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            engine.extend(step_ids, np.array([context]))  # at the same position again and again
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    ratio = benchmark.pedantic(lambda: step_time(1000) / step_time(100), rounds=3, warmup_rounds=1)
    benchmark.extra_info["step at 1000 / step at 100"] = ratio
    assert ratio < 4, f"a decode step at context 1,000 costs {ratio:.1f}x one at 100"
