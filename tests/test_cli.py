"""The CLI end to end: a tiny model trained, sampled and evaluated in seconds, and every bad input."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minigpt.cli import main


@pytest.fixture
def train_flags(tiny_flags):
    return tiny_flags(steps=30, eval_interval=15, eval_iters=2, quiet=True, sample_tokens=None)



def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_generate_eval_end_to_end(tmp_path, tiny_text_file, capsys, train_flags):
    ckpt = tmp_path / "model.safetensors"
    code, out, err = run(capsys, "train", "--data", str(tiny_text_file), "--out", str(ckpt),
                         "--sample_tokens", "40", *train_flags)
    assert code == 0, err
    assert ckpt.is_file() and len(out.strip()) > 0
    assert "step 30: train loss" in err
    records = [json.loads(line) for line in (tmp_path / "model.metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert "val_bpc" in records[14] and "val_bpc" in records[29]

    code, out, err = run(capsys, "generate", "--checkpoint", str(ckpt), "--prompt", "the ",
                         "--max_new_tokens", "25", "--temperature", "0")
    assert code == 0, err
    assert out.startswith("the ") and len(out.rstrip("\n")) == 4 + 25
    assert "tokens/s" in err

    code, out, err = run(capsys, "eval", "--checkpoint", str(ckpt))  # the data recorded in the checkpoint
    assert code == 0, err
    assert out.startswith("valid: loss") and "bits/char" in out


def test_train_on_a_text_without_newlines_ends_with_a_sample(tmp_path, capsys, train_flags):
    """The end-of-training sample starts from a newline, which this text lacks: it starts from the
    vocabulary's first character instead, and the run ends well."""
    text = tmp_path / "one line.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log " * 40, encoding="utf-8")
    ckpt = tmp_path / "model.safetensors"
    code, out, err = run(capsys, "train", "--data", str(text), "--out", str(ckpt), "--sample_tokens", "30",
                         *train_flags)
    assert code == 0, err
    assert ckpt.is_file() and len(out.rstrip("\n")) == 1 + 30 and out.startswith(" ")


def test_same_seed_same_text_and_greedy_is_repeatable(tiny_checkpoint, capsys):
    texts = []
    for seed in ("1", "1", "2"):
        code, out, _ = run(capsys, "generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "a",
                           "--max-new-tokens", "60", "--seed", seed, "--temperature", "1.5")
        assert code == 0
        texts.append(out)
    assert texts[0] == texts[1] != texts[2]


def test_eval_counts_every_character_of_the_split(tiny_checkpoint, tiny_text_file, capsys):
    """Every character, the first scored after a newline (as a text begins): the loss is the split's own."""
    from minigpt import load_checkpoint
    from minigpt.generation import evaluate_split

    code, out, _ = run(capsys, "eval", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_text_file))
    assert code == 0
    text = tiny_text_file.read_text()
    valid = text[int(len(text) * 0.9):]
    loaded = load_checkpoint(tiny_checkpoint)
    loss = evaluate_split(loaded.model, np.array(loaded.tokenizer.encode("\n" + valid)))
    assert f"valid: loss {loss:.4f} nats" in out and f"over {len(valid):,} characters" in out


@pytest.mark.parametrize("argv,fragments", [
    (["generate", "--prompt", "the QUICK fox"], ["'C'", "'Q'", "never saw"]),
    (["generate", "--top_p", "1.5"], ["top_p"]),
    (["generate", "--temperature", "-1"], ["temperature"]),
    (["generate", "--max_new_tokens", "-3"], ["max_new_tokens"]),
    (["generate", "--top_k", "0"], ["top_k"]),
    (["eval", "--split", "test"], ["no test split"]),
])
def test_bad_generate_and_eval_input(tiny_checkpoint, capsys, argv, fragments, one_line_error):
    code, out, err = run(capsys, *argv, "--checkpoint", str(tiny_checkpoint))
    one_line_error(code, out, err, *fragments)
    assert out == ""


def test_missing_and_corrupt_checkpoints(tmp_path, capsys, one_line_error):
    one_line_error(*run(capsys, "generate", "--checkpoint", str(tmp_path / "none.safetensors")),
                          "checkpoint not found")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    one_line_error(*run(capsys, "eval", "--checkpoint", str(corrupt)), "not a readable safetensors")


@pytest.mark.parametrize("flags,fragments", [
    (["--embed_dim", "30", "--num_heads", "4"], ["divisible by num_heads"]),
    (["--block-size", "0"], ["--block-size: must be an integer of at least 1"]),
    (["--steps", "0"], ["--steps: must be an integer of at least 1"]),
    (["--steps", "many"], ["--steps: must be an integer of at least 1, got 'many'"]),
    (["--device", "tpu"], ["device must be auto, cpu or cuda"]),
])
def test_impossible_training_settings(tmp_path, tiny_text_file, capsys, flags, fragments, one_line_error):
    out_file = tmp_path / "m.safetensors"
    code, out, err = run(capsys, "train", "--data", str(tiny_text_file), "--out", str(out_file), *flags)
    one_line_error(code, out, err, *fragments)
    assert not out_file.exists()


@pytest.mark.parametrize("content,fragments", [
    (b"", ["is empty"]),
    (b"caf\xe9 au lait " * 20, ["not UTF-8"]),
    (b"short text", ["needs at least 17"]),
])
def test_bad_training_data(tmp_path, capsys, content, fragments, train_flags, one_line_error):
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    out_file = tmp_path / "m.safetensors"
    code, out, err = run(capsys, "train", "--data", str(data), "--out", str(out_file), *train_flags)
    one_line_error(code, out, err, *fragments)
    assert not out_file.exists()


def test_existing_checkpoint_survives_a_failed_run(tmp_path, tiny_checkpoint, capsys, train_flags, one_line_error):
    out_file = tmp_path / "keep.safetensors"
    out_file.write_bytes(tiny_checkpoint.read_bytes())
    missing = tmp_path / "no-such-data.txt"
    code, _, err = run(capsys, "train", "--data", str(missing), "--out", str(out_file), "--force", *train_flags)
    one_line_error(code, "", err, "not found")  # even --force replaces it only once training is done
    assert out_file.read_bytes() == tiny_checkpoint.read_bytes()


@pytest.mark.slow
def test_installed_command_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "minigpt", "generate", "--checkpoint",
                             str(tmp_path / "missing.safetensors")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "checkpoint not found" in result.stderr


def flag_help(command):
    """{flag: help text} for every flag `minigpt COMMAND --help` lists (the dashed spellings)."""
    import argparse

    from minigpt.flags import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {flag: action.help for action in commands.choices[command]._actions
            if action.help != argparse.SUPPRESS for flag in action.option_strings}


def readme_flag_table(command):
    """{flags: meaning} from the reference's table under "## `minigpt COMMAND`" (docs/)."""
    page = {"train": "training.md", "generate": "generating.md"}[command]
    reference = (Path(__file__).parents[1] / "docs" / page).read_text(encoding="utf-8")
    section = reference.split(f"## `minigpt {command}`", 1)[1].split("\n#", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| `--")]
    return {tuple(re.findall(r"`(--[\w-]+)", flags)): meaning for flags, _, meaning in rows}


@pytest.mark.parametrize("command", ["train", "generate"])
def test_every_flag_is_explained_the_same_in_help_and_readme(command):
    helps = flag_help(command)
    table = readme_flag_table(command)
    documented = {flag for flags in table for flag in flags}
    assert documented == set(helps) - {"-h", "--help"}, "flags missing from the README table or from the CLI"
    for flags, meaning in table.items():
        text = re.sub(r"\s*\(default [^()]*(\([^()]*\)[^()]*)*\)$", "", helps[flags[0]]).replace("%%", "%")
        assert text == meaning.replace("`", ""), f"{flags[0]}: --help says {text!r}, the README {meaning!r}"


@pytest.mark.parametrize("command", ["train", "generate", "eval", "export"])
def test_help_says_what_every_flag_does(command, capsys):
    assert main([command, "--help"]) == 0
    assert "--no-kv_cache" not in capsys.readouterr().out  # one spelling listed; the other still works
    for flag, text in flag_help(command).items():
        assert text and not text.startswith("(default"), f"{command} {flag} has no explanation"
