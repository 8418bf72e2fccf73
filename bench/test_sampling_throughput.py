"""The sampler alone: the plain `Sampler` of the learner's path against `FastSampler` (the same numbers in
fewer numpy calls), picks per second on a 65-character vocabulary, side by side in one run.

    pytest bench/test_sampling_throughput.py
"""

import numpy as np
import pytest

from minigpt.fast_sampling import FastSampler
from minigpt.sampling import Sampler

SETTINGS = {"top-p": dict(temperature=0.8, top_p=0.95), "top-k": dict(temperature=1.0, top_k=5),
            "temperature": dict(temperature=0.9)}
CALLS = 2000


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("kind", ["plain", "fast"])
def test_sampler(benchmark, record_throughput, kind, setting, batch):
    sampler = {"plain": Sampler, "fast": FastSampler}[kind](**SETTINGS[setting])
    rng = np.random.default_rng(batch)
    logits = (rng.standard_normal((batch, 65)) * 3).astype(np.float32)
    draws = rng.random((CALLS, batch))
    benchmark.group = f"sampler {setting} batch {batch}"

    def run():
        return [sampler.pick(logits, row_draws) for row_draws in draws]

    picks = benchmark.pedantic(run, rounds=7, warmup_rounds=1)
    reference = Sampler(**SETTINGS[setting])
    assert [pick.tolist() for pick in picks[:50]] == [reference.pick(logits, d).tolist() for d in draws[:50]]
    record_throughput(benchmark, kind, CALLS, "picks/s")
