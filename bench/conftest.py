"""Benchmark helpers: engines report a rate, and the run ends with each group's ratios."""

import os
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

_RATES = defaultdict(dict)  # group -> {engine: (rate, unit)}
# What each family of targets is stated against.
BASELINES = ("ct2-fp32", "kv-cache", "onnx-plain", "torch-sdpa", "sdpa-flash", "clients-1", "eager", "memory",
             "plain")


@pytest.fixture
def record_throughput():
    """Call with (benchmark, engine, amount per round[, unit]) after timing; no-op when timing is disabled."""

    def record(benchmark, engine: str, amount: float, unit: str = "tokens/s") -> None:
        if benchmark.stats:
            rate = amount / benchmark.stats["median"]
            benchmark.extra_info.update({unit: rate, "unit": unit, "engine": engine})  # what `minigpt plot --bench`
            # draws
            _RATES[benchmark.group][engine] = (rate, unit)

    return record


def pytest_terminal_summary(terminalreporter):
    if not _RATES:
        return
    terminalreporter.section("rates (median round; ratio to the group's baseline engine)")
    for group, rates in _RATES.items():
        base = next((name for name in BASELINES if name in rates), next(iter(rates)))
        cells = [f"{engine} {rate:,.3g} {unit} ({rate / rates[base][0]:.2f}x)"
                 if rate < 100 else f"{engine} {rate:,.0f} {unit} ({rate / rates[base][0]:.2f}x)"
                 for engine, (rate, unit) in rates.items()]
        terminalreporter.write_line(f"{group}: " + " | ".join(cells))


def pytest_collection_modifyitems(items):
    """Every benchmark takes seconds: all of bench/ is left out of `pytest -m "not slow"`."""
    bench = Path(__file__).parent
    for item in items:
        if bench in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)
