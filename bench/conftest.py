"""Benchmark helpers: engines report tokens/s, and the run ends with each group's ratios."""

import os
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

_THROUGHPUT = defaultdict(dict)  # group -> {engine: tokens per second}
BASELINE = "kv-cache"  # the engine every generation target is stated against


@pytest.fixture
def record_throughput():
    """Call with (benchmark, engine name, tokens per round) after timing; no-op when timing is disabled."""

    def record(benchmark, engine: str, tokens: int) -> None:
        if benchmark.stats:
            rate = tokens / benchmark.stats["median"]
            benchmark.extra_info["tokens_per_s"] = rate
            _THROUGHPUT[benchmark.group][engine] = rate

    return record


def pytest_terminal_summary(terminalreporter):
    if not _THROUGHPUT:
        return
    terminalreporter.section(f"throughput (tokens/s, median round; ratio to {BASELINE}, else the first listed)")
    for group, rates in _THROUGHPUT.items():
        base_name = BASELINE if BASELINE in rates else next(iter(rates))
        cells = [f"{engine} {rate:,.0f} ({rate / rates[base_name]:.2f}x)" for engine, rate in rates.items()]
        terminalreporter.write_line(f"{group}: " + " | ".join(cells))
