"""Pictures: training curves, attention maps and benchmark charts, made through the CLI and checked as images."""

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("matplotlib", reason="pictures need the plot extra: pip install 'minigpt[plot]'")
import matplotlib.image  # noqa: E402

from minigpt import load_checkpoint  # noqa: E402
from minigpt.attention_maps import attention_maps  # noqa: E402
from minigpt.plot import attention_of, read_metrics, training_curves  # noqa: E402


def png_size(path):
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


@pytest.fixture
def metrics(tiny_checkpoint, tmp_path):
    """The tiny run's metrics log (60 steps, evaluated at 60), copied where a test may damage it."""
    path = tmp_path / "tiny.metrics.jsonl"
    shutil.copy(tiny_checkpoint.with_name("tiny.metrics.jsonl"), path)
    return path


@pytest.mark.slow
def test_training_curves_of_one_and_of_several_runs(metrics, tmp_path, cli_error, capsys):
    from minigpt.cli import main

    out = tmp_path / "curves.png"
    assert main(["plot", "--metrics", str(metrics), "--out", str(out)]) == 0
    assert png_size(out) == (900, 650)  # figsize (9, 6.5) at 100 dpi

    other = tmp_path / "other.metrics.jsonl"
    other.write_text("".join(json.dumps({**r, "loss": r["loss"] + 0.5}) + "\n"
                             for r in read_metrics(metrics)[0]))
    assert main(["plot", "--metrics", str(metrics), str(other), "--out", str(tmp_path / "both.svg")]) == 0
    assert (tmp_path / "both.svg").read_text().lstrip().startswith("<?xml")  # SVG when the name says so

    figure = training_curves({"tiny": read_metrics(metrics)[0], "other": read_metrics(other)[0]})
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert "tiny: validation loss" in legend and "other: validation loss" in legend
    assert figure.axes[1].get_xlabel() == "step"
    assert sorted(axis.get_xlabel() or axis.get_ylabel() for axis in figure.axes[0].child_axes) == [
        "bits per character", "tokens seen"]


def test_an_interrupted_runs_log_is_drawn_up_to_its_cut(metrics, tmp_path, capsys):
    from minigpt.cli import main

    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 61, "lo')  # killed mid-write
    assert main(["plot", "--metrics", str(metrics), "--out", str(tmp_path / "c.png")]) == 0
    assert "last line is incomplete" in capsys.readouterr().err
    assert len(read_metrics(metrics)[0]) == len(whole.splitlines())


@pytest.mark.parametrize("content,fragment", [("", "has no training records"),
                                              ('{"step": 1}\n{"step": 2, "loss": 1, "lr": 1}\n',
                                               "line 1 is not a training record"),
                                              (None, "metrics file not found")])
def test_bad_metrics_files(tmp_path, cli_error, content, fragment):
    path = tmp_path / "run.metrics.jsonl"
    if content is not None:
        path.write_text(content)
    cli_error(["plot", "--metrics", str(path), "--out", str(tmp_path / "c.png")], fragment)
    assert not (tmp_path / "c.png").exists()


def test_unwritable_or_unknown_outputs(metrics, tmp_path, cli_error):
    cli_error(["plot", "--metrics", str(metrics), "--out", str(tmp_path / "no" / "c.png")], "cannot write to")
    cli_error(["plot", "--metrics", str(metrics), "--out", str(tmp_path / "c.jpg")], "must end in .png or .svg")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cli_error(["plot", "--metrics", str(metrics), "--out", str(locked / "c.png")], "cannot write to")


def test_attention_weights_are_the_models_own(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint).model
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
    maps = attention_maps(model, ids)  # (layers, batch, heads, T, T)
    config = model.config
    assert maps.shape == (config.num_layers, 1, config.num_heads, 10, 10)
    assert torch.allclose(maps.sum(-1), torch.ones(()), atol=1e-6)  # each row a distribution
    assert torch.all(torch.triu(maps, diagonal=1) == 0)  # nothing from the future
    assert torch.all(maps[..., 0, 0] == 1)  # the first character can only look at itself
    # The weights are the ones that made each layer's output in the model's own (fused) forward pass.
    seen = []
    hooks = [block.attn.register_forward_hook(lambda layer, inputs, output: seen.append((layer, inputs[0], output)))
             for block in model.blocks]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    for weights, (layer, x, output) in zip(maps, seen):
        values = layer.heads(x)[2]
        written_out = layer.proj((weights @ values).transpose(1, 2).reshape(x.shape))
        assert torch.allclose(written_out, output, atol=1e-5)
    assert len(seen) == config.num_layers


def test_attention_pictures(tiny_checkpoint, tmp_path, capsys):
    from minigpt.cli import main

    grid, one = tmp_path / "grid.png", tmp_path / "one.png"
    assert main(["attention", "--checkpoint", str(tiny_checkpoint), "--prompt", "the quick\nbrown", "--out",
                 str(grid)]) == 0
    assert png_size(grid) == (2 * 300 + 120, 2 * 300 + 80)  # 2 heads x 2 layers of 3-inch maps
    assert main(["attention", "--checkpoint", str(tiny_checkpoint), "--prompt", "the lazy dog " * 3,
                 "--layer", "1", "--head", "0", "--out", str(one)]) == 0
    assert png_size(one) == (870, 830)
    assert "--prompt" not in capsys.readouterr().err

    model, tokenizer = (lambda c: (c.model, c.tokenizer))(load_checkpoint(tiny_checkpoint))
    figure, note = attention_of(model, tokenizer, "the quick brown fox jumps over the lazy dog. " * 3, head=1)
    assert note == "the prompt's last 16 of 135 characters"  # the tiny model's block is 16
    labels = [t.get_text() for t in figure.axes[-2].get_xticklabels()]  # the last map's row of labels
    assert labels[-5:] == ["d", "o", "g", ".", "␣"]  # the last characters, the space drawn visibly


def test_every_label_of_a_grid_of_maps_is_readable():
    """The 8 maps of the default model (2 layers x 4 heads) with the longest prompt drawn: every character label
    in a 9-point font, and each with at least its own height of room along its map."""
    from minigpt.config import GPTConfig
    from minigpt.model import MiniGPT
    from minigpt.plot import MAX_ATTENTION_CHARS
    from minigpt.tokenizer import CharTokenizer

    text = ("the quick brown fox jumps over the lazy dog " * 2)[:MAX_ATTENTION_CHARS]
    tokenizer = CharTokenizer.from_text(text)
    figure, _ = attention_of(MiniGPT(GPTConfig(tokenizer.vocab_size)).eval(), tokenizer, text)
    figure.canvas.draw()
    maps = [axis for axis in figure.axes if axis.get_title().startswith("layer")]
    assert len(maps) == 8
    for axis in maps:
        labels = [label for label in axis.get_yticklabels() + axis.get_xticklabels() if label.get_text()]
        assert all(label.get_fontsize() >= 9 for label in labels)
        height = axis.get_window_extent().height * 72 / figure.dpi  # points
        assert height / len(text) >= 9, f"{height / len(text):.1f} points a character"


@pytest.mark.parametrize("argv,fragment", [
    (["--prompt", "The Quick"], "never saw"),
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "the", "--layer", "5"], "--layer must be from 0 to 1"),
    (["--prompt", "the", "--head", "-1"], "--head: must be an integer of at least 0"),
    (["--prompt", "the", "--head", "2"], "--head must be from 0 to 1"),
])
def test_bad_attention_requests(tiny_checkpoint, tmp_path, cli_error, argv, fragment):
    cli_error(["attention", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "a.png"), *argv], fragment)
    assert not (tmp_path / "a.png").exists()


def bench_json(path, timed=True):
    """pytest-benchmark's JSON as `--benchmark-json` writes it for a generate group (the fields read here)."""
    rates = {"no-cache": 500.0, "kv-cache": 1600.0, "onnx-fp32": 8300.0}
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": [
        {"group": "generate default batch 1", "name": f"test_generate[{engine}-default-1]",
         "params": {"engine": engine, "config": "default", "batch": 1},
         "stats": {"median": 120 / rate} if timed else None,
         "extra_info": {"tokens/s": rate, "unit": "tokens/s", "engine": engine} if timed else {}}
        for engine, rate in rates.items()]}))
    return path


def test_benchmark_chart(tmp_path, cli_error, capsys):
    from minigpt.cli import main

    out = tmp_path / "bench.png"
    assert main(["plot", "--bench", str(bench_json(tmp_path / "b.json")), "--out", str(out)]) == 0
    capsys.readouterr()
    width, height = png_size(out)
    assert width == 900 and height > 100
    from minigpt.plot import bench_chart, read_bench

    figure = bench_chart(read_bench(tmp_path / "b.json"))
    labels = [text.get_text() for text in figure.axes[0].texts]
    assert labels == [" 500 (0.31x)", " 1,600 (1.00x)", " 8,300 (5.19x)"]  # ratio to the KV-cache engine

    cli_error(["plot", "--bench", str(bench_json(tmp_path / "u.json", timed=False))], "holds no timed rates")
    (tmp_path / "bad.json").write_text("[1, 2]")
    cli_error(["plot", "--bench", str(tmp_path / "bad.json")], "is not pytest-benchmark JSON")
    cli_error(["plot", "--bench", str(tmp_path / "b.json"), "--metrics", "x"], "give one of them")


def test_without_matplotlib_the_error_names_the_extra(cli_without, metrics):
    result = cli_without("matplotlib", ["plot", "--metrics", str(metrics)])
    assert result.returncode == 2 and "pip install 'minigpt[plot]'" in result.stderr, result.stderr


def test_training_curves_are_drawn_without_torch(cli_without, metrics, tmp_path):
    """`minigpt plot` reads a JSON log: it draws where torch cannot even be imported (the helper fails the
    run if torch was imported)."""
    out = tmp_path / "curves.png"
    result = cli_without("torch", ["plot", "--metrics", str(metrics), "--out", str(out)])
    assert result.returncode == 0, result.stderr
    assert png_size(out)[0] > 100


def test_bits_per_character_against_training_seconds(metrics, tmp_path, cli_error, capsys):
    """`--against seconds`: each run's evaluations at the seconds it had trained, the footing on which models with
    other tokenizers compare; a log without seconds (an older minigpt's) is refused in one line."""
    from minigpt.cli import main
    from minigpt.plot import bits_against_seconds

    records = read_metrics(metrics)[0]
    evaluated = [r for r in records if "val_bpc" in r]
    assert evaluated and all(r["seconds"] > 0 for r in records)
    assert [r["seconds"] for r in records] == sorted(r["seconds"] for r in records)
    figure = bits_against_seconds({"tiny": records})
    (line,) = figure.axes[0].get_lines()
    assert list(line.get_xdata()) == [r["seconds"] for r in evaluated]
    assert list(line.get_ydata()) == [r["val_bpc"] for r in evaluated]
    assert main(["plot", "--against", "seconds", "--metrics", str(metrics), "--out", str(tmp_path / "s.png")]) == 0
    capsys.readouterr()
    old = tmp_path / "old.metrics.jsonl"
    old.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "seconds"}) + "\n" for r in records))
    cli_error(["plot", "--against", "seconds", "--metrics", str(old), "--out", str(tmp_path / "o.png")],
              "training seconds", "against the step")
