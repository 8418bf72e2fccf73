"""What a first-time user does, run the way they run it: the installed command in a fresh process.

Each test is one mistake newcomers make (or a README step followed to the
letter); none may lose work, print a traceback or leave a half-written file.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test runs the installed command in fresh processes

from minigpt import load_checkpoint
from minigpt.config import TrainConfig
from minigpt.training import learning_rate_at



def minigpt(*argv, cwd, **kwargs):
    return subprocess.run([sys.executable, "-m", "minigpt", *map(str, argv)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, **kwargs)


@pytest.fixture
def workdir(tmp_path, tiny_checkpoint, tiny_text_file):
    """A folder after the quick start: minigpt.safetensors (trained), its log, and the text it read."""
    shutil.copy(tiny_checkpoint, tmp_path / "minigpt.safetensors")
    (tmp_path / "minigpt.metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    shutil.copy(tiny_text_file, tmp_path / "input.txt")
    return tmp_path


def snapshot(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def test_training_again_never_replaces_a_trained_model(workdir, process_error, tiny_flags):
    before = snapshot(workdir)
    line = process_error(minigpt("train", "--data", "input.txt", "--steps", "3", *tiny_flags(), cwd=workdir),
                          "minigpt.safetensors already holds a trained model", "--force",
                          "--resume minigpt.safetensors")
    assert "different model" not in line  # the same architecture is refused too
    assert snapshot(workdir) == before  # checkpoint and log untouched


def test_resume_writes_back_to_the_checkpoint_it_resumes(workdir):
    step = load_checkpoint(workdir / "minigpt.safetensors").step
    shutil.move(workdir / "minigpt.safetensors", workdir / "mine.safetensors")
    result = minigpt("train", "--resume", "mine.safetensors", "--steps", step + 2, "--quiet", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(workdir / "mine.safetensors").step == step + 2
    assert not (workdir / "minigpt.safetensors").exists()
    records = (workdir / "mine.metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in records] == [step + 1, step + 2]


def test_an_interrupted_run_resumes_with_its_own_settings_from_the_printed_command(tmp_path, tiny_text_file,
                                                                                 wait_for, tiny_flags):
    flags = ["--data", tiny_text_file, "--learning-rate", "2e-3", "--warmup", "3", "--eval-interval", "7",
             *tiny_flags()]
    process = subprocess.Popen([sys.executable, "-m", "minigpt", "train", *map(str, flags), "--steps", "100000",
                                "--quiet"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "minigpt.metrics.jsonl"
    assert wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 3, timeout=120)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    command = re.search(r"Resume with: (.*)$", err.strip()).group(1)
    assert command == "minigpt train --resume minigpt.safetensors"  # minimal: everything else is stored
    stopped = load_checkpoint(tmp_path / "minigpt.safetensors").step

    # The printed command, with --steps lowered so the test ends: the one flag given is the one overridden.
    result = minigpt(*command.split()[1:], "--steps", stopped + 14, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"training settings, except --steps {stopped + 14}\n" in result.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, stopped + 15))  # appended, not restarted
    resumed = TrainConfig(learning_rate=2e-3, warmup=3, steps=stopped + 14)
    for record in records[stopped:]:
        assert record["lr"] == pytest.approx(learning_rate_at(record["step"] - 1, resumed))
    evaluated = [r["step"] for r in records[stopped:] if "val_loss" in r]
    assert evaluated == [s for s in range(stopped + 1, stopped + 15) if s % 7 == 0 or s == stopped + 14]


def test_every_output_path_is_checked_before_any_work(workdir, process_error, tiny_flags):
    (workdir / "somedir").mkdir()
    before = snapshot(workdir)
    process_error(minigpt("train", "--data", "input.txt", "--out", "somedir", "--force", *tiny_flags(), cwd=workdir),
                   "--out somedir is a folder")
    process_error(minigpt("export", "--onnx", "--out", "somedir", "--force", cwd=workdir),
                   "--out somedir is a folder")
    process_error(minigpt("export", "--hf", "--out", "input.txt", "--force", cwd=workdir),
                   "--out input.txt is a file")
    process_error(minigpt("train", "--data", "input.txt", "--out", "no/such/folder/m.safetensors", *tiny_flags(),
                           cwd=workdir), "cannot write to no/such/folder")
    (workdir / "new.metrics.jsonl").mkdir()  # the log beside the checkpoint cannot be written either
    process_error(minigpt("train", "--data", "input.txt", "--out", "new.safetensors", *tiny_flags(), cwd=workdir),
                   "the metrics log new.metrics.jsonl (written beside new.safetensors) is a folder")
    assert snapshot(workdir) == before


def test_a_closed_stdout_ends_quietly_as_cat_does(workdir):
    result = subprocess.run(f"{sys.executable} -m minigpt generate --max-new-tokens 2000 | head -c 100; "
                            "echo \" ${PIPESTATUS[0]}\" >&2", shell=True, executable="/bin/bash", cwd=workdir,
                            capture_output=True, text=True, timeout=300)
    assert len(result.stdout) == 100
    assert result.stderr.strip() == str(128 + signal.SIGPIPE), result.stderr  # no traceback, cat's status


@pytest.mark.parametrize("argv", [["generate", "--seed", "-1"], ["generate", "--seed", str(2**64)],
                                  ["train", "--data", "input.txt", "--out", "x.safetensors", "--seed", "-1"]])
def test_seeds_are_checked_alike_in_every_command(workdir, argv, process_error):
    process_error(minigpt(*argv, cwd=workdir), "--seed: must be an integer from 0 to 2**63-1")


@pytest.fixture(scope="module")
def exported_once(tmp_path_factory, tiny_checkpoint):
    folder = tmp_path_factory.mktemp("exported")
    shutil.copy(tiny_checkpoint, folder / "minigpt.safetensors")
    result = minigpt("export", "--onnx", "--no-verify", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder / "minigpt.onnx"


@pytest.fixture
def exported(workdir, exported_once):
    """The quick start's folder after `minigpt export --onnx` (run once for the module, its file copied here)."""
    shutil.copy(exported_once, workdir / "minigpt.onnx")
    return workdir


@pytest.mark.parametrize("argv", [["eval", "--checkpoint", "minigpt.onnx"],
                                  ["export", "--onnx", "--checkpoint", "minigpt.onnx", "--out", "again.onnx"],
                                  ["generate", "--engine", "torch", "--model", "minigpt.onnx"],
                                  ["train", "--resume", "minigpt.onnx"]])
def test_an_onnx_model_where_a_checkpoint_belongs_is_named(exported, argv, process_error):
    process_error(minigpt(*argv, cwd=exported), "minigpt.onnx is an ONNX model",
                   "minigpt generate --model minigpt.onnx")


@pytest.mark.parametrize("argv,fragments", [
    (["generate", "--engine", "onnx", "--model", "minigpt.safetensors"],
     ["is a minigpt checkpoint, not an ONNX model", "--engine torch"]),
    (["generate", "--engine", "onnx", "--model", "."], [". is a folder, not an ONNX model"]),
    (["eval", "--checkpoint", "input.txt"], ["input.txt is a text file, not a checkpoint", "--data"]),
    (["generate", "--checkpoint", "minigpt.metrics.jsonl"], ["is a text file, not a checkpoint"]),
    (["generate", "--checkpoint", "."], [". is a directory but not a minigpt/GPT-2 export"]),
    (["generate", "--model", "minigpt.onnx", "--device", "cuda"], ["onnx engine runs on the CPU",
                                                                   "drop --device cuda"]),
])
def test_the_wrong_kind_of_file_or_flag_is_named(exported, argv, fragments, process_error):
    process_error(minigpt(*argv, cwd=exported), *fragments)


def test_flags_device_and_paths_are_checked_before_the_data(workdir, process_error):
    # No --data: the default corpus would be loaded (and say so in a line of its own) if these came later.
    process_error(minigpt("train", "--device", "cuda", "--out", "new.safetensors", cwd=workdir),
                   "no CUDA GPU is available")
    process_error(minigpt("train", "--block-size", "100000", cwd=workdir),
                   "minigpt.safetensors already holds a trained model")
    process_error(minigpt("train", "--embed-dim", "30", "--num-heads", "4", "--device", "cuda", cwd=workdir),
                   "embed_dim (30) must be divisible by num_heads (4)")


def test_each_checkpoint_has_its_own_log(workdir, tiny_flags):
    for name in ("a", "b"):
        result = minigpt("train", "--data", "input.txt", "--out", f"{name}.safetensors", "--steps", "3", "--quiet",
                         *tiny_flags(), cwd=workdir)
        assert result.returncode == 0, result.stderr
    for name in ("a", "b"):
        assert len((workdir / f"{name}.metrics.jsonl").read_text().splitlines()) == 3
    assert (workdir / "minigpt.metrics.jsonl").read_text() == '{"step": 1, "loss": 3.0}\n'  # not touched


def test_a_folder_of_text_files_trains_as_one_text(workdir, tiny_flags):
    books = workdir / "books"
    books.mkdir()
    text = (workdir / "input.txt").read_text(encoding="utf-8")
    for number, part in enumerate((text[:len(text) // 2], text[len(text) // 2:])):
        (books / f"part{number}.txt").write_text(part, encoding="utf-8")
    result = minigpt("train", "--data", "books", "--out", "books.safetensors", "--steps", "2", *tiny_flags(),
                     cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert f"training characters from {books.resolve()}" in result.stderr


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two cores: one for a busy process, both for the run")
def test_training_leaves_a_core_busy_with_other_work_to_it(workdir, tiny_flags):
    """Threads on a core that another process keeps busy make every step wait for it: by default a run takes
    the cores that are free when it starts, and says why it took fewer."""
    first, second = sorted(os.sched_getaffinity(0))[:2]
    spin = "import time\nend = time.time() + 60\nwhile time.time() < end: pass"  # bounded, killed sooner
    busy = subprocess.Popen([sys.executable, "-c", spin], preexec_fn=lambda: os.sched_setaffinity(0, {second}))
    try:
        time.sleep(0.5)  # running flat out by the time the run looks
        result = minigpt("train", "--data", "input.txt", "--out", "busy.safetensors", "--steps", "1", *tiny_flags(),
                         cwd=workdir, preexec_fn=lambda: os.sched_setaffinity(0, {first, second}))
    finally:
        busy.kill()
        busy.wait()
    assert result.returncode == 0, result.stderr
    assert "on cpu (1 thread; " in result.stderr and "cores busy with other work)" in result.stderr, result.stderr


def test_stderr_into_a_file_gets_no_progress_bar(workdir, tiny_flags):
    with open(workdir / "log", "w") as log:
        result = subprocess.run([sys.executable, "-m", "minigpt", "train", "--data", "input.txt", "--out",
                                 "m.safetensors", "--steps", "40", "--eval-interval", "20", *tiny_flags()],
                                cwd=workdir, stdout=subprocess.DEVNULL, stderr=log, timeout=300)
    text = (workdir / "log").read_text()
    assert result.returncode == 0, text
    assert "\r" not in text and "it/s" not in text and "step/s" not in text
    assert [line for line in text.splitlines() if line.startswith("step ")] == [
        line for line in text.splitlines() if re.fullmatch(r"step (20|40): train loss .* bits/char\)", line)]
    progress = [line for line in text.splitlines() if re.fullmatch(r"minigpt: step \d+/40: loss .* s left", line)]
    assert len(text.splitlines()) - len(progress) == 4  # parameters, two evaluations, the summary


def test_off_a_terminal_a_plain_progress_line_comes_every_interval(workdir, tiny_flags, monkeypatch, capsys):
    """Silent for minutes between evaluations is a run that looks hung: off a terminal (pytest's captured
    stderr is one) a line says where the run is, every PROGRESS_EVERY seconds (here every step)."""
    import minigpt.train
    from minigpt.cli import main

    monkeypatch.setattr(minigpt.train, "PROGRESS_EVERY", 0.0)
    monkeypatch.chdir(workdir)
    assert main(["train", "--data", "input.txt", "--out", "p.safetensors", "--steps", "6", "--eval-interval", "6",
                 *tiny_flags()]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("minigpt: step ")]
    assert [int(re.match(r"minigpt: step (\d+)/6: loss [\d.]+, [\d,]+ tokens/s, [\d,]+ s left", line).group(1))
            for line in lines] == [1, 2, 3, 4, 5]  # the last step has its own summary


def test_the_python_pages_examples_run_as_written(tmp_path):
    readme = (Path(__file__).parents[1] / "docs" / "python.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    training = next(block for block in blocks if "minigpt.train.train(" in block)
    generating = next(block for block in blocks if "load_checkpoint(" in block)
    (tmp_path / "input.txt").write_text("The cat sat on the mat. The dog ran to the park.\n" * 60)
    script = training + generating.replace('"minigpt.safetensors"', '"tiny.safetensors"')
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation loss" in result.stdout and (tmp_path / "tiny.metrics.jsonl").is_file()


def test_a_run_resumes_on_as_many_threads_as_it_ran_on(tmp_path, tiny_text_file, tiny_flags):
    """Sums split over another thread count round differently, so the thread count is one of the settings a
    checkpoint records: the printed resume command (no --threads) trains on as many threads as the run did."""
    flags = ["--data", tiny_text_file, "--eval-interval", "4", *tiny_flags(threads=1)]
    first = minigpt("train", *flags, "--steps", "4", "--out", "r.safetensors", cwd=tmp_path)
    assert first.returncode == 0 and "on cpu (1 thread)" in first.stderr, first.stderr
    assert json.loads(load_checkpoint(tmp_path / "r.safetensors").metadata["train_config"])["threads"] == 1
    resumed = minigpt("train", "--resume", "r.safetensors", "--steps", "6", cwd=tmp_path)
    assert resumed.returncode == 0 and "on cpu (1 thread)" in resumed.stderr, resumed.stderr
    assert "--threads" not in resumed.stderr  # not an override: the recorded setting
