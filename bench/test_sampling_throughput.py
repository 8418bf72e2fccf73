"""The sampler alone: the plain `Sampler` of the learner's path against `FastSampler` (the same numbers in
fewer numpy calls), picks per second on a 65-character vocabulary, the two in turn in one benchmark.

    pytest bench/test_sampling_throughput.py
"""

import time
from types import SimpleNamespace

import numpy as np
import pytest

from minigpt.fast_sampling import FastSampler
from minigpt.sampling import Sampler

SETTINGS = {"top-p": dict(temperature=0.8, top_p=0.95), "top-k": dict(temperature=1.0, top_k=5),
            "temperature": dict(temperature=0.9)}
CALLS, ROUNDS = 1000, 15


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_sampler(benchmark, record_throughput, setting, batch):
    samplers = {"plain": Sampler(**SETTINGS[setting]), "fast": FastSampler(**SETTINGS[setting])}
    rng = np.random.default_rng(batch)
    logits = (rng.standard_normal((batch, 65)) * 3).astype(np.float32)
    draws = rng.random((CALLS, batch))
    benchmark.group = f"sampler {setting} batch {batch}"
    seconds, picks = {name: [] for name in samplers}, {}

    def in_turn():  # A B, B A, ...: a slow spell of a shared host hits both alike
        for round_number in range(ROUNDS if benchmark.enabled else 1):
            for name, sampler in list(samplers.items())[::-1 if round_number % 2 else 1]:
                started = time.perf_counter()
                picks[name] = [sampler.pick(logits, row_draws).tolist() for row_draws in draws]
                seconds[name].append(time.perf_counter() - started)

    benchmark.pedantic(in_turn, rounds=1, iterations=1)
    assert picks["plain"] == picks["fast"]  # the same token for every draw
    for name, times in seconds.items():
        timed = SimpleNamespace(group=benchmark.group, stats={"median": float(np.median(times))}, extra_info={})
        record_throughput(timed if benchmark.stats else benchmark, name, CALLS, "picks/s")
        benchmark.extra_info[f"{name} picks/s"] = CALLS / float(np.median(times))
