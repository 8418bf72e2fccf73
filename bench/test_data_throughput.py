"""Data at scale: encoding speed, time to the first training step (cold and cached) and peak memory.

    pytest bench/test_data_throughput.py -s                          # a 64 MB corpus
    MINIGPT_BENCH_DATA_MB=1024 pytest bench/test_data_throughput.py -s  # 1 GB

The corpus is generated in a temporary folder (no data is committed): lines
of words over a 283-character alphabet like WikiText-2's, accents and CJK
included. Each measurement runs `minigpt train` machinery in a fresh process
(`load_corpus`, the default model, one training step), so peak RSS is that
process's own; the cache lives in the temporary folder.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

SIZE_MB = int(os.environ.get("MINIGPT_BENCH_DATA_MB", "64"))

FIRST_STEP = textwrap.dedent("""
    import json, resource, sys, time
    start = time.perf_counter()
    import torch
    from minigpt.config import GPTConfig, TrainConfig
    from minigpt.data import load_corpus
    from minigpt.model import MiniGPT
    from minigpt.training import make_optimizer, sample_batch, training_step
    imported = time.perf_counter()
    corpus = load_corpus(sys.argv[1], sys.argv[2])
    encoded = time.perf_counter()
    ids = corpus.split("train")
    model = MiniGPT(GPTConfig(vocab_size=len(corpus.chars))).train()
    device = torch.device("cpu")
    optimizer = make_optimizer(model, TrainConfig(), device)
    generator = torch.Generator().manual_seed(0)
    x, y = sample_batch(ids, 32, model.config.block_size, generator, device)
    training_step(model, optimizer, x, y, 1.0, device)
    print(json.dumps({"encode_s": encoded - imported, "first_step_s": time.perf_counter() - start,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "characters": len(ids) + len(corpus.split("valid"))}))
""")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    alphabet = [chr(c) for c in range(32, 127)] + list("àáâäçèéêëîïñóôöùúûüœß—–‘’“”…€£°±×") + \
        [chr(c) for c in range(0x4E00, 0x4E00 + 154)]
    words = ["".join(rng.choice(alphabet[33:59] + alphabet[65:91], size=rng.integers(2, 9))) for _ in range(4000)]
    words += alphabet  # every character appears
    block = "\n".join(" ".join(rng.choice(words, size=12)) for _ in range(20_000)) + "\n"
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    encoded = block.encode("utf-8")
    with path.open("wb") as f:
        for _ in range(max(1, SIZE_MB * 2**20 // len(encoded))):
            f.write(encoded)
    return path


def first_step(corpus, cache) -> dict:
    result = subprocess.run([sys.executable, "-c", FIRST_STEP, str(corpus), str(cache)], capture_output=True,
                            text=True, check=True, timeout=3600)
    return json.loads(result.stdout)


def test_cold_and_cached_start(benchmark, corpus_file, tmp_path):
    """Cold: the corpus is encoded into an empty cache, then one step. Cached: the same again."""
    benchmark.group = "data"
    cache = tmp_path / "cache"
    size_mb = corpus_file.stat().st_size / 1e6
    cold = benchmark.pedantic(first_step, args=(corpus_file, cache), rounds=1, iterations=1)
    cached = first_step(corpus_file, cache)
    benchmark.extra_info.update({"size_mb": size_mb, "encode_mb_per_s": size_mb / cold["encode_s"],
                                 "cold": cold, "cached": cached})
    print(f"\n{size_mb:,.0f} MB, {cold['characters']:,} characters: encoded at {size_mb / cold['encode_s']:,.0f} MB/s; "
          f"first step {cold['first_step_s']:.1f} s cold, {cached['first_step_s']:.1f} s cached; peak RSS "
          f"{cold['peak_rss_mb']:,.0f} MB cold, {cached['peak_rss_mb']:,.0f} MB cached")
    assert cached["characters"] == cold["characters"]


@pytest.mark.parametrize("where", ["memmap", "memory"])
def test_training_steps_from_the_map_and_from_memory(benchmark, record_throughput, corpus_file, tmp_path, where):
    """Steps of the default model with batches read from the memory-mapped cache or from an in-memory copy."""
    import torch

    from minigpt.config import GPTConfig, TrainConfig
    from minigpt.data import load_corpus
    from minigpt.model import MiniGPT
    from minigpt.training import make_optimizer, sample_batch, training_step

    benchmark.group = "data: training from"
    corpus = load_corpus(corpus_file, tmp_path / "cache")
    ids = corpus.split("train") if where == "memmap" else np.array(corpus.split("train")[:50_000_000])
    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=len(corpus.chars))).train()
    device = torch.device("cpu")
    optimizer = make_optimizer(model, TrainConfig(), device)
    generator = torch.Generator().manual_seed(0)

    def step():
        x, y = sample_batch(ids, 32, model.config.block_size, generator, device)
        return training_step(model, optimizer, x, y, 1.0, device)

    loss = step()  # a fresh model on real windows: about ln(vocabulary), as a uniform guess
    assert math.isfinite(loss) and abs(loss - math.log(len(corpus.chars))) < 1.5, loss
    started = time.perf_counter()
    benchmark(step)
    benchmark.extra_info["wall_s"] = time.perf_counter() - started
    record_throughput(benchmark, where, 32 * model.config.block_size)
