"""The decoding loop's µs a step over stored logits (`test_decode_loop.py`'s free engine), for whichever minigpt
this Python imports: run it against two checkouts in turn to compare them.

    python bench/loop_cost.py                           # this checkout
    PYTHONPATH=/path/to/other/checkout python bench/loop_cost.py
"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from minigpt.decoding import generate_rows  # noqa: E402
from minigpt.fast_sampling import FastSampler  # noqa: E402
from test_decode_loop import FreeEngine  # noqa: E402

STEPS, REPEATS = 3000, 7


def main() -> None:
    figures = []
    for batch in (1, 8):
        for name, settings in (("greedy", dict(temperature=0)), ("top-p", dict(temperature=0.8, top_p=0.95, seed=1))):
            times = []
            for _ in range(REPEATS):
                started = time.perf_counter()
                sampler, engine = FastSampler(**settings), FreeEngine(block_size=4096)
                for _ in generate_rows(engine, [[1, 2, 3]] * batch, STEPS, sampler):
                    pass
                times.append((time.perf_counter() - started) / STEPS)
            figures.append(f"{name} batch {batch}: {np.median(times) * 1e6:.2f} µs")
    print(" | ".join(figures))


if __name__ == "__main__":
    main()
