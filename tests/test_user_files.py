"""Following minigpt's own advice never destroys a user's file: every command's output is checked against its
inputs and against what is there, the same way (`minigpt.paths.check_replaceable`), and one checkpoint has
one writer. Each case runs the installed command in a fresh process, as a user meets it."""

import hashlib
import os
import subprocess
import sys
import time

import pytest

from tiny import TINY_TEXT

pytestmark = pytest.mark.slow


def minigpt(*argv, cwd, wait=True):
    command = [sys.executable, "-m", "minigpt", *map(str, argv)]
    if not wait:
        return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def fingerprints(folder):
    """Every file below `folder` and a hash of its bytes."""
    return {path.relative_to(folder): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def folder(tmp_path, tiny_checkpoint):
    """A user's folder: a corpus, notes, a trained checkpoint and a picture."""
    (tmp_path / "corpus.txt").write_text(TINY_TEXT)
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "model.safetensors").write_bytes(tiny_checkpoint.read_bytes())
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("keep me")
    return tmp_path


@pytest.mark.parametrize("argv,fragments", [
    (["train", "--data", "corpus.txt", "--out", "corpus.txt"], ["--out corpus.txt is also this command's --data"]),
    (["train", "--data", "corpus.txt", "--out", "corpus.txt", "--force"], ["is also this command's --data"]),
    (["train", "--data", "corpus.txt", "--out", "notes.txt", "--force"],
     ["notes.txt is a text file", "replaces only a minigpt checkpoint"]),
    (["train", "--data", "corpus.txt", "--init-from", "model.safetensors", "--out", "model.safetensors", "--force"],
     ["is also this command's --init-from"]),
    (["export", "--onnx", "--checkpoint", "model.safetensors", "--out", "model.safetensors", "--force"],
     ["is also this command's --checkpoint"]),
    (["export", "--onnx", "--checkpoint", "model.safetensors", "--out", "notes.txt", "--force"],
     ["is a text file", "replaces only an ONNX model"]),
    (["export", "--hf", "--checkpoint", "model.safetensors", "--out", "mine", "--force"],
     ["mine is a folder", "replaces only a transformers directory"]),
    (["plot", "--metrics", "corpus.txt", "--out", "picture.png"], ["already holds a picture", "--force"]),
    (["attention", "--checkpoint", "model.safetensors", "--prompt", "the", "--out", "picture.png"],
     ["already holds a picture", "--force"]),
])
def test_an_output_never_replaces_an_input_or_another_kind_of_file(folder, process_error, argv, fragments):
    before = fingerprints(folder)
    process_error(minigpt(*argv, cwd=folder), *fragments)
    assert fingerprints(folder) == before


def test_force_replaces_what_the_command_writes(folder):
    assert minigpt("attention", "--checkpoint", "model.safetensors", "--prompt", "the", "--out", "picture.png",
                   "--force", cwd=folder).returncode == 0
    assert (folder / "picture.png").stat().st_size > 1000


def test_a_picture_minigpt_drew_is_drawn_again_without_force(folder):
    """`minigpt plot; minigpt plot` after more training: the picture minigpt wrote (its mark in the PNG's or
    SVG's metadata) is replaced, as matplotlib users expect; a picture of anyone else's still needs --force."""
    (folder / "run.metrics.jsonl").write_text("".join(f'{{"step": {step}, "loss": {3 - step / 10}, "lr": 0.001}}\n'
                                                      for step in range(1, 6)))
    for out in ("curves.png", "curves.svg"):
        assert minigpt("plot", "--metrics", "run.metrics.jsonl", "--out", out, cwd=folder).returncode == 0
        first = (folder / out).read_bytes()
        with (folder / "run.metrics.jsonl").open("a") as log:
            log.write('{"step": 6, "loss": 2.0, "lr": 0.001}\n')
        again = minigpt("plot", "--metrics", "run.metrics.jsonl", "--out", out, cwd=folder)
        assert again.returncode == 0, again.stderr
        assert (folder / out).read_bytes() != first
    for _ in range(2):
        result = minigpt("attention", "--checkpoint", "model.safetensors", "--prompt", "the", "--out", "a.png",
                         cwd=folder)
        assert result.returncode == 0, result.stderr
    assert minigpt("plot", "--metrics", "run.metrics.jsonl", "--out", "picture.png", cwd=folder).returncode == 2


def test_a_second_training_into_one_checkpoint_is_refused(folder, tiny_flags, process_error, wait_for):
    flags = tiny_flags(steps=100_000, eval_interval=100_000, quiet=True)
    first = minigpt("train", "--data", "corpus.txt", "--out", "run.safetensors", *flags, cwd=folder, wait=False)
    lock, log = folder / ".run.safetensors.lock", folder / "run.metrics.jsonl"
    try:  # once a step is logged the run is in its loop, where SIGTERM saves and stops
        assert wait_for(lambda: log.exists() and log.stat().st_size > 0, timeout=120), first.communicate()
        assert lock.exists()
        second = minigpt("train", "--data", "corpus.txt", "--out", "run.safetensors", *flags, cwd=folder)
        process_error(second, f"another minigpt train (process {first.pid}) is writing run.safetensors")
    finally:
        first.terminate()  # SIGTERM: it saves, then exits 143
        first.communicate(timeout=120)
    assert first.returncode == 143 and (folder / "run.safetensors").exists() and not lock.exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(folder, tiny_flags):
    """...and the temporaries its killed saves left are removed (what else lies beside them is not)."""
    (folder / ".run.safetensors.lock").write_text("999999999\n")  # no process holds it
    stale = [folder / ".run.safetensors.k2x_9a0b.tmp", folder / ".run.safetensors.00v2665m.tmp"]
    others = [folder / ".other.safetensors.k2x_9a0b.tmp", folder / ".run.safetensors.notes.tmp"]
    for path in stale + others:
        path.write_bytes(b"\0" * 1000)
    result = minigpt("train", "--data", "corpus.txt", "--out", "run.safetensors", *tiny_flags(steps=2),
                     cwd=folder)
    assert result.returncode == 0, result.stderr
    assert not (folder / ".run.safetensors.lock").exists()
    assert not any(path.exists() for path in stale) and all(path.exists() for path in others)


def test_runs_from_two_folders_are_two_lines(tmp_path):
    from minigpt.plot import run_labels

    assert run_labels(["a/minigpt.metrics.jsonl", "b/minigpt.metrics.jsonl", "c/small.metrics.jsonl"]) == \
        ["a/minigpt.metrics.jsonl", "b/minigpt.metrics.jsonl", "small"]


def test_time_is_not_wasted_before_refusing(folder, process_error):
    """The refusal comes before any data is read or model built."""
    started = time.monotonic()
    process_error(minigpt("train", "--data", "corpus.txt", "--out", "corpus.txt", cwd=folder), "--data")
    assert time.monotonic() - started < 60 and os.path.getsize(folder / "corpus.txt") == len(TINY_TEXT)


def test_the_data_is_recorded_where_it_is_and_a_change_is_named(tmp_path, tiny_flags, process_error):
    """Trained in one folder on a relative --data, evaluated from another folder that has a file of the same
    name: eval reads the file the model was trained on; once that file changes, it says so."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    (first / "input.txt").write_text(TINY_TEXT)
    (second / "input.txt").write_text(TINY_TEXT.upper())
    assert minigpt("train", "--data", "input.txt", *tiny_flags(steps=2), cwd=first).returncode == 0
    result = minigpt("eval", "--checkpoint", first / "minigpt.safetensors", cwd=second)
    assert result.returncode == 0 and f"of {first / 'input.txt'}" in result.stdout, result.stdout + result.stderr
    (first / "input.txt").write_text(TINY_TEXT + "more text\n")
    process_error(minigpt("eval", "--checkpoint", first / "minigpt.safetensors", cwd=second),
                  f"{first / 'input.txt'} has changed since the model was trained on it", "--data")
    process_error(minigpt("train", "--resume", first / "minigpt.safetensors", "--steps", 4, cwd=second),
                  "has changed since the model was trained on it")


def test_a_cache_folder_that_cannot_be_made_is_one_line(folder, process_error):
    process_error(minigpt("train", "--data", "corpus.txt", "--cache-dir", "notes.txt", "--steps", 1, cwd=folder),
                  "cannot make the cache folder notes.txt", "--cache-dir")
    result = subprocess.run([sys.executable, "-m", "minigpt", "train", "--data", "corpus.txt", "--steps", "1"],
                            cwd=folder, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "XDG_CACHE_HOME": str(folder / "notes.txt" / "below")})
    process_error(result, "cannot make the cache folder", "XDG_CACHE_HOME")


def test_sizes_that_cannot_fit_are_refused_before_allocating(folder, process_error):
    available = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    row = 2 * 2 * 16 * 32 * 4  # the tiny model's cache: layers x (k, v) x positions x width x 4 bytes
    rows = 2 * available // row
    process_error(minigpt("generate", "--checkpoint", "model.safetensors", "--num-samples", rows, cwd=folder),
                  f"a KV-cache of {rows:,} rows needs", "GiB available", "lower --num-samples")
    process_error(minigpt("train", "--data", "corpus.txt", "--embed-dim", 100_000, "--num-heads", 1, cwd=folder),
                  "training a model of", "GiB available", "lower --embed-dim")


def test_a_save_that_cannot_finish_keeps_the_old_checkpoint(folder, tiny_flags):
    """A file-size limit (as a full disk): one line, and the checkpoint --force was replacing is untouched."""
    import resource
    import signal

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    before = (folder / "model.safetensors").read_bytes()
    result = subprocess.run([sys.executable, "-m", "minigpt", "train", "--data", "corpus.txt", "--out",
                             "model.safetensors", "--force", *tiny_flags(steps=2)], cwd=folder,
                            capture_output=True, text=True, timeout=300, preexec_fn=limited)
    # Training had begun, so its start lines come first; the error is the last line, with no traceback.
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("minigpt train: error: cannot write model.safetensors (File "
                                                      "too large): the previous file is untouched; free some space "
                                                      "or choose another --out")
    assert (folder / "model.safetensors").read_bytes() == before
    assert not [path for path in folder.iterdir() if path.name.endswith(".tmp")]


def test_a_batch_that_cannot_fit_is_refused_at_once_in_process(tiny_loaded):
    """Nothing is made for each row of a batch (its random streams, its records) before the cache that must
    hold them all is known to fit: millions of rows are refused in a moment, not after minutes of work."""
    import time

    from minigpt import MiniGPTError
    from minigpt.decoding import generate_rows
    from minigpt.generation import KVCacheEngine
    from minigpt.sampling import Sampler

    started = time.monotonic()
    with pytest.raises(MiniGPTError, match="rows needs"):
        next(generate_rows(KVCacheEngine(tiny_loaded.model), [[1]] * 20_000_000, 5, Sampler(seed=1)))
    assert time.monotonic() - started < 10
