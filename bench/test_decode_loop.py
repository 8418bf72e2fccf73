"""The decoding loop's own cost, the engine's excluded: what `generate_rows`, `Rows` and the step add to each
engine call, in microseconds.

    pytest bench/test_decode_loop.py

`free`: an engine whose `extend` hands back stored logits, so every microsecond measured is the loop's.
`onnx`: the default architecture's graph on onnxruntime (one thread), its calls timed apart from the rest:
what the loop costs where it runs for real, on a cache the graph call has just used.
"""

import time

import numpy as np
import pytest

from minigpt import MiniGPT
from minigpt.config import GPTConfig
from minigpt.decoding import generate_rows
from minigpt.fast_sampling import FastSampler

TOKENS, ROUNDS = 1000, 9
SAMPLERS = {"greedy": dict(temperature=0), "top-p": dict(temperature=0.8, top_p=0.95, seed=1)}


class FreeEngine:
    """Logits already made: the loop's time alone."""

    verifies_rows_together = True

    def __init__(self, block_size: int = 128, vocab: int = 65):
        self.block_size = block_size
        self.logits = np.random.default_rng(0).standard_normal((8, 1, vocab)).astype(np.float32)

    def start(self, batch_size: int) -> None:
        pass

    def extend(self, ids, start_pos, first_row=0, last_only=False):
        width = 1 if last_only else ids.shape[1]
        return self.logits[:len(ids)] if width == 1 else np.zeros((len(ids), width, 65), np.float32)

    def move_row(self, source, target, length) -> None:
        pass


class TimedEngine:
    """An engine with the time spent inside its calls counted."""

    def __init__(self, engine):
        self.engine, self.seconds = engine, 0.0
        self.block_size, self.verifies_rows_together = engine.block_size, engine.verifies_rows_together

    def start(self, batch_size: int) -> None:
        self.engine.start(batch_size)

    def extend(self, ids, start_pos, first_row=0, last_only=False):
        started = time.perf_counter()
        logits = self.engine.extend(ids, start_pos, first_row, last_only)
        self.seconds += time.perf_counter() - started
        return logits

    def move_row(self, source, target, length) -> None:
        self.engine.move_row(source, target, length)


@pytest.fixture(scope="module")
def onnx_engine(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from minigpt.export.onnx_engine import OnnxEngine, graph_metadata
    from minigpt.export.onnx_export import to_onnx_bytes, with_metadata
    from minigpt.tokenizer import CharTokenizer

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    tokenizer = CharTokenizer(chr(32 + i) for i in range(65))
    model = MiniGPT(GPTConfig(vocab_size=65)).eval()
    path = tmp_path_factory.mktemp("loop") / "default.onnx"
    path.write_bytes(with_metadata(to_onnx_bytes(model), graph_metadata(model.config, tokenizer)))
    return OnnxEngine(path, threads=1)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("sampling", list(SAMPLERS))
@pytest.mark.parametrize("engine_name", ["free", "onnx"])
def test_loop_cost_per_step(benchmark, request, engine_name, sampling, batch):
    engine = TimedEngine(FreeEngine() if engine_name == "free" else request.getfixturevalue("onnx_engine"))
    benchmark.group = f"decoding loop {engine_name} {sampling}"
    outside, texts = [], []
    for _ in range(ROUNDS if benchmark.enabled else 1):
        engine.seconds = 0.0
        started = time.perf_counter()
        ids = list(generate_rows(engine, [[1, 2, 3]] * batch, TOKENS, FastSampler(**SAMPLERS[sampling])))
        outside.append((time.perf_counter() - started - engine.seconds) / TOKENS)
        texts.append(np.stack(ids, axis=1))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert all(text.shape == (batch, TOKENS) and np.array_equal(text, texts[0]) for text in texts)  # same seed
    benchmark.extra_info.update({"us per step outside the engine": min(outside) * 1e6, "batch": batch})
    print(f"\n{engine_name} {sampling} batch {batch}: {min(outside) * 1e6:.1f} us a step outside the engine")
