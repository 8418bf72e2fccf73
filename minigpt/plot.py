"""Pictures for learners: training curves, attention maps and benchmark charts (matplotlib, headless).

Each picture is a function returning a matplotlib Figure, so it can be shown
in a notebook, and `save` writes it as PNG (or SVG when the name says so).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from minigpt.errors import MiniGPTError

LN2 = math.log(2)
FORMATS = (".png", ".svg")
MAX_ATTENTION_CHARS = 48  # more characters than this and the labels of a map stop being readable
LABEL_SPACING = 1.6  # a map's rows, in label heights: room for the labels and the map's own margins
VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}  # whitespace drawn as something one can see
BASELINE_ENGINE = "kv-cache"


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed), or a one-line error naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise MiniGPTError("pictures need matplotlib: pip install 'minigpt[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MARK = "minigpt"  # what a picture of ours says made it: PNG's Software text, SVG's creator


def check_output(path: str | os.PathLike, *, force: bool = True, inputs=()) -> Path:
    """A picture's path: .png or .svg, writable; a picture minigpt drew is replaced (drawing again after more
    training is the point), any other picture only with force, never one of `inputs` ((flag, path) pairs) or
    a file that is not a picture."""
    from minigpt.paths import check_output_file, check_replaceable

    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise MiniGPTError(f"--out {path} must end in .png or .svg")
    check_output_file(path)
    check_replaceable(path, writes="picture", force=force or drawn_by_minigpt(path), inputs=inputs)
    return path


def drawn_by_minigpt(path: Path) -> bool:
    """Whether the picture at `path` carries our mark (read from its first 64 KiB: PNG text chunks come before
    the image data, SVG metadata before the drawing)."""
    try:
        with path.open("rb") as file:
            head = file.read(1 << 16)
    except OSError:
        return False
    if path.suffix.lower() == ".png":
        return b"tEXtSoftware\x00" + MARK.encode() in head
    return f"<dc:title>{MARK}</dc:title>".encode() in head


def run_labels(paths: list[str]) -> list[str]:
    """A legend label for each metrics log: its name without .metrics.jsonl, or the path as given where two
    names are the same (two folders' minigpt.metrics.jsonl are two runs)."""
    names = [Path(path).name.removesuffix(".metrics.jsonl").removesuffix(".jsonl") for path in paths]
    return [str(path) if names.count(name) > 1 else name for path, name in zip(paths, names)]


def save(figure, path: str | os.PathLike) -> Path:
    """Write `figure` to `path` (checked first), PNG or SVG by its suffix, whole or not at all."""
    from minigpt.paths import atomic_write_bytes

    path = Path(path)
    import io

    buffer = io.BytesIO()
    kind = path.suffix[1:].lower()
    figure.savefig(buffer, format=kind, dpi=100, metadata={"Software" if kind == "png" else "Creator": MARK})
    atomic_write_bytes(path, buffer.getvalue())
    pyplot().close(figure)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Training curves


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], str | None]:
    """The records of a NAME.metrics.jsonl, and a note when its last line was cut off (an interrupted run)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MiniGPTError(f"metrics file not found: {path}; `minigpt train` writes NAME.metrics.jsonl beside "
                           "its checkpoint") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MiniGPTError(f"cannot read {path} ({exc}); pass a NAME.metrics.jsonl written by minigpt train") from None
    records, note = [], None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not {"step", "loss", "lr"} <= record.keys():
                raise ValueError("not a training record")
        except ValueError as exc:
            if number == len(lines):  # a run stopped mid-write: keep what was whole
                note = (f"{path}: its last line is incomplete (an interrupted run?); "
                        f"plotting the {len(records)} records before it")
                break
            raise MiniGPTError(f"{path} line {number} is not a training record ({exc}); pass a NAME.metrics.jsonl "
                               "written by minigpt train") from None
        records.append(record)
    if not records:
        raise MiniGPTError(f"{path} has no training records; train first, or pass another --metrics")
    return records, note


def training_curves(runs: dict[str, list[dict]]):
    """Loss against step (nats on the left, bits per character on the right, tokens seen on top) and the
    learning rate underneath, for one or more runs."""
    plt = pyplot()
    figure, (loss_axis, lr_axis) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True,
                                                gridspec_kw={"height_ratios": [3, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (name, records), color in zip(runs.items(), colors * len(runs)):
        label = f"{name}: " if len(runs) > 1 else ""
        steps = [r["step"] for r in records]
        loss_axis.plot(steps, [r["loss"] for r in records], color=color, alpha=0.25, linewidth=0.8,
                       label=f"{label}train loss (each step)")
        evaluated = [r for r in records if "val_loss" in r]
        if evaluated:
            eval_steps = [r["step"] for r in evaluated]
            loss_axis.plot(eval_steps, [r["train_loss"] for r in evaluated], color=color, linestyle="--",
                           marker=".", label=f"{label}train loss (evaluated)")
            loss_axis.plot(eval_steps, [r["val_loss"] for r in evaluated], color=color, marker="o",
                           label=f"{label}validation loss")
        lr_axis.plot(steps, [r["lr"] for r in records], color=color, label=name)
    loss_axis.set_ylabel("loss (nats per character)")
    loss_axis.secondary_yaxis("right", functions=(lambda nats: nats / LN2, lambda bits: bits * LN2)) \
        .set_ylabel("bits per character")
    loss_axis.grid(alpha=0.3)
    loss_axis.legend(fontsize="small")
    per_step = {records[-1]["tokens"] / records[-1]["step"] for records in runs.values() if "tokens" in records[-1]}
    if len(per_step) == 1 and all("tokens" in records[-1] for records in runs.values()):
        (tokens_per_step,) = per_step
        top = loss_axis.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step,
                                                          lambda t: t / tokens_per_step))
        top.set_xlabel("tokens seen")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("step")
    lr_axis.grid(alpha=0.3)
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if len(runs) > 1:
        lr_axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


def bits_against_seconds(runs: dict[str, list[dict]]):
    """Validation bits per character against training seconds, one line a run: models with other tokenizers
    (a subword's loss is per token) compared on the same footing and the same clock."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 5))
    for name, records in runs.items():
        evaluated = [r for r in records if "val_bpc" in r and "seconds" in r]
        if not evaluated:
            raise MiniGPTError(f"{name} has no evaluations with their training seconds; plot runs trained by this "
                               "minigpt, or plot against the step")
        axis.plot([r["seconds"] for r in evaluated], [r["val_bpc"] for r in evaluated], marker="o", label=name)
    axis.set_xlabel("training seconds")
    axis.set_ylabel("validation bits per character")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


# ---------------------------------------------------------------------------------------------------------------
# Attention maps


def visible(text: str) -> list[str]:
    return [VISIBLE.get(char, char) for char in text]


def attention_figure(weights, text: str, layers: list[int], heads: list[int], note: str | None = None):
    """Heatmaps of (layers, heads, T, T) weights: queries down, keys across, the text's characters on both axes.

    One map is drawn large with every character labelled; a grid labels its
    outer maps only.
    """
    plt = pyplot()
    rows, cols = len(layers), len(heads)
    single = rows == cols == 1
    labels = visible(text)
    font = 10 if single else 9
    # Each character a label's height and a little more, so that none overlaps its neighbours.
    size = max(7.5 if single else 3.0, len(labels) * font * LABEL_SPACING / 72)
    figure, axes = plt.subplots(rows, cols, figsize=(size * cols + 1.2, size * rows + 0.8), squeeze=False,
                                layout="constrained")
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            axis = axes[r][c]
            image = axis.imshow(weights[r][c], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            axis.set_title(f"layer {layer}, head {head}", fontsize="medium" if single else "small")
            ticks = range(len(labels))
            axis.set_xticks(ticks, labels if single or r == rows - 1 else [""] * len(labels), fontsize=font,
                            rotation=90)
            axis.set_yticks(ticks, labels if single or c == 0 else [""] * len(labels), fontsize=font)
    figure.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    title = "what each character (row) attends to among the characters up to it (columns)"
    figure.suptitle(title + (f"\n{note}" if note else ""), fontsize="medium")
    return figure


def attention_of(model, tokenizer, prompt: str, *, layer: int | None = None, head: int | None = None,
                 max_chars: int = MAX_ATTENTION_CHARS):
    """The model's attention weights for `prompt` as a figure: every layer × head, one layer's heads, one head
    across layers, or one map when both are given."""
    import torch

    from minigpt.attention_maps import attention_maps

    if not prompt:
        raise MiniGPTError("the prompt is empty: give a few characters with --prompt")
    config = model.config
    for name, value, count in (("layer", layer, config.num_layers), ("head", head, config.num_heads)):
        if value is not None and not 0 <= value < count:
            raise MiniGPTError(f"--{name} must be from 0 to {count - 1} (the model has {count}), got {value}")
    ids = tokenizer.encode(prompt)
    keep = min(max_chars, config.block_size)
    note = None
    if len(ids) > keep:
        note = f"the prompt's last {keep} of {len(ids)} characters"
        ids, prompt = ids[-keep:], prompt[-keep:]
    device = next(model.parameters()).device
    maps = attention_maps(model, torch.tensor([ids], device=device))[:, 0].float().cpu().numpy()  # (L, H, T, T)
    layers = [layer] if layer is not None else list(range(config.num_layers))
    heads = [head] if head is not None else list(range(config.num_heads))
    weights = [[maps[row][column] for column in heads] for row in layers]
    return attention_figure(weights, prompt, layers, heads, note), note


# ---------------------------------------------------------------------------------------------------------------
# Benchmark charts


def read_bench(path: str | os.PathLike) -> dict[str, list[tuple[str, float, str]]]:
    """{group: [(engine, rate, unit), ...]} from pytest-benchmark's --benchmark-json output."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        benchmarks = data["benchmarks"]
    except FileNotFoundError:
        raise MiniGPTError(f"benchmark file not found: {path}; make one with "
                           "`pytest bench/ --benchmark-json=FILE`") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MiniGPTError(f"{path} is not pytest-benchmark JSON ({exc}); make one with "
                           "`pytest bench/ --benchmark-json=FILE`") from None
    groups: dict[str, list] = {}
    for bench in benchmarks:
        info = bench.get("extra_info") or {}
        unit = info.get("unit") or next((key for key in info if key.endswith("/s")), None)
        if unit is None or not isinstance(info.get(unit), (int, float)):
            continue  # not timed, or not a rate
        engine = info.get("engine") or "-".join(str(v) for v in (bench.get("params") or {}).values()) or bench["name"]
        groups.setdefault(bench.get("group") or bench["name"], []).append((engine, float(info[unit]), unit))
    if not groups:
        raise MiniGPTError(f"{path} holds no timed rates; run `pytest bench/ --benchmark-json=FILE` without "
                           "--benchmark-disable")
    return groups


def bench_chart(groups: dict[str, list[tuple[str, float, str]]]):
    """One panel per group: each engine's rate as a bar, with its ratio to the KV-cache engine (or, in groups
    without one, to the group's first engine) written on the bar."""
    plt = pyplot()
    figure, axes = plt.subplots(len(groups), 1, figsize=(9, 0.5 + sum(0.42 * len(r) + 0.9 for r in groups.values())),
                                squeeze=False, gridspec_kw={"height_ratios": [len(r) + 1.5 for r in groups.values()]})
    for axis, (group, rates) in zip(axes[:, 0], groups.items()):
        engines = [engine for engine, _, _ in rates]
        values = [rate for _, rate, _ in rates]
        base = values[engines.index(BASELINE_ENGINE)] if BASELINE_ENGINE in engines else values[0]
        base_name = BASELINE_ENGINE if BASELINE_ENGINE in engines else engines[0]
        bars = axis.barh(engines, values, color=["tab:gray" if e == base_name else "tab:blue" for e in engines])
        axis.bar_label(bars, [f" {v:,.0f} ({v / base:.2f}x)" for v in values], fontsize="small")
        axis.invert_yaxis()
        axis.set_xlim(0, max(values) * 1.3)
        axis.set_title(f"{group} (ratio to {base_name})", fontsize="medium", loc="left")
        axis.set_xlabel(rates[0][2])
        axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return figure
