"""What minigpt says when a newcomer slips, through the installed command in a fresh process: the flag the user
typed, the command's own --help, the file's real kind, and no advice that cannot apply."""

import stat
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def minigpt(*argv, cwd):
    return subprocess.run([sys.executable, "-m", "minigpt", *map(str, argv)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("argv,fragments", [
    (["train", "--stepz", "3"], ["unrecognized arguments: --stepz 3; did you mean --steps?", "minigpt train --help"]),
    (["generate", "--temprature", "0.5"], ["did you mean --temperature?", "minigpt generate --help"]),
    (["train", "--resume", "gone.safetensors"], ["--resume gone.safetensors: checkpoint not found"]),
    (["train", "--init-from", "gone.safetensors"], ["--init-from gone.safetensors: checkpoint not found"]),
    (["export", "--onnx", "--checkpoint", "tiny.safetensors", "--opset", "99", "--out", "x.onnx"],
     ["--opset 99 is newer than this onnx", "choose from 17"]),
])
def test_messages_name_what_the_user_typed(tmp_path, tiny_checkpoint, process_error, argv, fragments):
    (tmp_path / "tiny.safetensors").write_bytes(tiny_checkpoint.read_bytes())
    line = process_error(minigpt(*argv, cwd=tmp_path), *fragments)
    assert "--checkpoint" not in line or "--checkpoint" in argv


def test_underscore_spellings_of_no_flags_work(tmp_path, tiny_checkpoint):
    result = minigpt("generate", "--checkpoint", tiny_checkpoint, "--no_kv_cache", "--max-new-tokens", 5,
                     "--temperature", 0, cwd=tmp_path)
    assert result.returncode == 0 and "RecomputeEngine" in result.stderr, result.stderr
    result = minigpt("export", "--onnx", "--no_verify", "--checkpoint", tiny_checkpoint, "--out", "m.onnx",
                     cwd=tmp_path)
    assert result.returncode == 0 and (tmp_path / "m.onnx").exists(), result.stderr


def test_resume_of_a_transformers_directory_points_to_init_from(tmp_path, tiny_checkpoint, process_error):
    assert minigpt("export", "--hf", "--checkpoint", tiny_checkpoint, "--out", "hf", cwd=tmp_path).returncode == 0
    process_error(minigpt("train", "--resume", "hf", cwd=tmp_path), "--resume hf is a transformers directory",
                  "--init-from hf")


def test_an_hf_export_honours_the_umask_and_version_is_printed(tmp_path, tiny_checkpoint):
    assert minigpt("export", "--hf", "--checkpoint", tiny_checkpoint, "--out", "hf", cwd=tmp_path).returncode == 0
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in [tmp_path / "hf", *(tmp_path / "hf").iterdir()]}
    assert modes.pop("hf") == 0o755 and set(modes.values()) == {0o644}, modes  # the suite's umask is 022
    version = minigpt("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("minigpt 0.")


def test_a_non_finite_loss_gives_advice_that_applies(tmp_path, tiny_text_file, tiny_flags):
    result = minigpt("train", "--data", tiny_text_file, "--out", "m.safetensors",
                     *tiny_flags(learning_rate=1e9, grad_clip=0, steps=30, eval_interval=30), cwd=tmp_path)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "the loss became" in last, result.stderr
    assert "nothing was saved" in last and "clip the gradient with --grad-clip 1" in last, last


def test_the_torch_engine_picks_its_threads_as_the_onnx_engine_does(tiny_checkpoint, capsys):
    """One thread for one sample of a small model (a busy core then stalls no step); every core for a batch."""
    import torch

    from minigpt.cli import main

    before = torch.get_num_threads()
    try:
        argv = ["generate", "--checkpoint", str(tiny_checkpoint), "--engine", "torch", "--max-new-tokens", "2"]
        assert main(argv) == 0
        assert torch.get_num_threads() == 1
        torch.set_num_threads(before)
        assert main(["generate", "--checkpoint", str(tiny_checkpoint), "--engine", "torch", "--max-new-tokens", "2",
                     "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_resume_on_other_data_names_init_from(tmp_path, tiny_checkpoint, process_error):
    """--resume continues a run on its own data; new text is a new run from the weights: the refusal names the
    command that starts it."""
    (tmp_path / "new.txt").write_text("the cat and the hat. " * 200)
    process_error(minigpt("train", "--resume", tiny_checkpoint, "--data", "new.txt", "--steps", "100000",
                          "--out", "more.safetensors", cwd=tmp_path),
                  "--resume continues", f"minigpt train --init-from {tiny_checkpoint} --data new.txt")
    assert not (tmp_path / "more.safetensors").exists()
