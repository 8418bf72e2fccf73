"""Every subcommand meets bad input with exit 2 and one line naming the problem and the fix.

Nothing is written or overwritten, and no traceback escapes. The loader is
also fuzzed: random bytes and random metadata may only ever produce its
one clear error.
"""

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes

from minigpt import load_checkpoint
from minigpt.cli import main
from minigpt.errors import CheckpointError


@pytest.fixture(scope="module")
def good(tiny_checkpoint):
    """The tiny checkpoint's tensors and metadata, to damage one piece at a time."""
    checkpoint = load_checkpoint(tiny_checkpoint)
    tensors = {k: v.contiguous() for k, v in checkpoint.model.state_dict().items() if k != "lm_head.weight"}
    metadata = {"config": checkpoint.model.config.to_json(), "vocab": checkpoint.tokenizer.to_json()}
    return tensors, metadata


def damaged(good, kind):
    tensors, metadata = dict(good[0]), dict(good[1])
    config = json.loads(metadata["config"])
    if kind == "truncated":
        return safetensors_bytes(tensors, metadata)[:300]
    if kind == "random bytes":
        return os.urandom(4096)
    if kind == "empty file":
        return b""
    if kind == "no config":
        del metadata["config"]
    elif kind == "config not json":
        metadata["config"] = "{block_size: 16"
    elif kind == "config wrong types":
        metadata["config"] = json.dumps({**config, "embed_dim": "wide"})
    elif kind == "heads do not divide":
        metadata["config"] = json.dumps({**config, "num_heads": 5})
    elif kind == "absurd depth":
        metadata["config"] = json.dumps({**config, "num_layers": 10**9})
    elif kind == "no vocab":
        del metadata["vocab"]
    elif kind == "vocab not a string":
        metadata["vocab"] = json.dumps(["a", "b"])
    elif kind == "vocab size mismatch":
        metadata["vocab"] = json.dumps("abc")
    elif kind == "weights of another shape":
        tensors["blocks.0.mlp.fc.weight"] = torch.zeros(7, 7)
    elif kind == "missing weights":
        del tensors["ln_final.weight"]
    return safetensors_bytes(tensors, metadata)


DAMAGE = ["truncated", "random bytes", "empty file", "no config", "config not json", "config wrong types",
          "heads do not divide", "absurd depth", "no vocab", "vocab not a string", "vocab size mismatch",
          "weights of another shape", "missing weights"]
COMMANDS = {
    "generate": lambda ckpt, tmp: ["generate", "--checkpoint", ckpt, "--max-new-tokens", "5"],
    "eval": lambda ckpt, tmp: ["eval", "--checkpoint", ckpt],
    "export": lambda ckpt, tmp: ["export", "--onnx", "--checkpoint", ckpt, "--out", str(tmp / "out.onnx")],
    "train --resume": lambda ckpt, tmp: ["train", "--resume", ckpt, "--out", str(tmp / "out.safetensors")],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_checkpoints(good, tmp_path, cli_error, command, kind):
    ckpt = tmp_path / "bad.safetensors"
    ckpt.write_bytes(damaged(good, kind))
    line = cli_error(COMMANDS[command](str(ckpt), tmp_path))
    assert str(ckpt) in line  # the message names the file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]  # nothing written


@pytest.mark.parametrize("command", list(COMMANDS))
def test_missing_checkpoint(tmp_path, cli_error, command):
    cli_error(COMMANDS[command](str(tmp_path / "absent.safetensors"), tmp_path),
              "not found")


BAD_DATA = [("train", b"", "is empty"), ("train", b"\xff\xfe\x00 bad bytes " * 20, "not UTF-8"),
            ("train", b"too short", "needs at least"),
            ("eval", b"", "is empty"), ("eval", b"\xff\xfe\x00 bad bytes " * 20, "not UTF-8")]


@pytest.mark.parametrize("command,content,fragment", BAD_DATA)
def test_bad_data(tiny_checkpoint, tmp_path, cli_error, command, content, fragment):
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    if command == "train":
        argv = ["train", "--data", str(data), "--out", str(tmp_path / "m.safetensors"), "--block_size", "16",
                "--embed_dim", "32", "--num_heads", "2", "--steps", "2", "--quiet"]
    else:
        argv = ["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(data)]
    cli_error(argv, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]


def test_folder_without_the_split_a_command_needs(tiny_checkpoint, tmp_path, capsys, cli_error):
    for split in ("valid", "test"):  # like WikiText-2 raw's published valid and test files alone
        (tmp_path / f"wiki.{split}.raw").write_text("the quick brown fox jumps over the lazy dog. " * 5)
    cli_error(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m.safetensors"),
               "--quiet"], "has no train split (it has: valid, test)")
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path), "--split", "test"]) == 0
    assert "test: loss" in capsys.readouterr().out


@pytest.mark.parametrize("flags,fragment", [
    (["--embed_dim", "0"], "--embed_dim: must be an integer of at least 1"),
    (["--num_layers", "-2"], "--num_layers: must be an integer of at least 1"),
    (["--num_heads", "3", "--embed_dim", "32"], "divisible by num_heads"),
    (["--dropout", "1.5"], "--dropout: must be a number from 0 to 0.99"),
    (["--batch_size", "0"], "--batch_size: must be an integer of at least 1"),
    (["--learning_rate", "-1"], "--learning_rate: must be a number above 0"),
])
def test_impossible_configs(tiny_text_file, tmp_path, cli_error, flags, fragment):
    cli_error(["train", "--data", str(tiny_text_file), "--out",
               str(tmp_path / "m.safetensors"), *flags], fragment)


@pytest.mark.parametrize("flags,fragment", [
    (["--temperature", "-0.1"], "temperature"), (["--top_k", "-3"], "top_k"), (["--top_p", "1.01"], "top_p"),
    (["--top_p", "nan"], "top_p"), (["--num_samples", "0"], "num_samples"),
    (["--max_new_tokens", "-5"], "max_new_tokens"),
    (["--temperature", "warm"], "--temperature: must be a number of at least 0, got 'warm'"),
    (["--prompt", "ÆØÅ"], "never saw"), (["--attention", "fast"], "invalid choice"),
])
def test_out_of_range_sampling_flags(tiny_checkpoint, cli_error, flags, fragment):
    cli_error(["generate", "--checkpoint", str(tiny_checkpoint), *flags], fragment)


@pytest.mark.parametrize("command", ["train", "export"])
def test_unwritable_output_folder(tiny_checkpoint, tiny_text_file, tmp_path, cli_error, command):
    out = tmp_path / "no" / "such" / "folder" / "model.out"
    if command == "train":
        argv = ["train", "--data", str(tiny_text_file), "--out", str(out), "--block_size", "16", "--embed_dim",
                "32", "--num_heads", "2", "--steps", "2", "--eval_interval", "1", "--quiet"]
    else:
        argv = ["export", "--onnx", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]
    cli_error(argv, "cannot write to")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_loader_fuzzed_with_random_bytes(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats() | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                           max_leaves=10)
field_values = st.one_of(st.integers(-5, 300), st.floats(), st.text(max_size=5), st.none())


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=st.one_of(st.text(), json_values.map(json.dumps),
                        st.fixed_dictionaries({}, optional={name: field_values for name in (
                            "vocab_size", "block_size", "embed_dim", "num_heads", "num_layers", "mlp_ratio",
                            "dropout")}).map(json.dumps)),
       vocab=st.one_of(st.text(), json_values.map(json.dumps)))
def test_loader_fuzzed_with_random_metadata(good, tmp_path, config, vocab):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(safetensors_bytes(good[0], {"config": config, "vocab": vocab}))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
