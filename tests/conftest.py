"""Shared fixtures. Nothing here touches the network: the hub is forced offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Triton reads this when a kernel is defined: set before anything imports
# minigpt.kernels.triton_attention, so the kernels run on CPU tensors here.
os.environ["TRITON_INTERPRET"] = "1"
# Encoded data goes to a cache folder of this run's own, not the user's.
os.environ["XDG_CACHE_HOME"] = __import__("tempfile").mkdtemp(prefix="minigpt-test-cache-")

import pytest  # noqa: E402

TINY_TEXT = ("the quick brown fox jumps over the lazy dog.\n"
             "a small model learns to spell one character at a time.\n") * 40
TINY_MODEL = dict(block_size=16, embed_dim=32, num_heads=2, num_layers=2)


@pytest.fixture(scope="session")
def tiny_model():
    """GPTConfig fields of the tiny model every fast test trains."""
    return dict(TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_text_file):
    """A checkpoint trained for a few seconds on TINY_TEXT, shared by the tests that only read it."""
    from minigpt.config import TrainConfig
    from minigpt.data import load_corpus
    from minigpt.train import train

    out = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    config = TrainConfig(batch_size=16, learning_rate=3e-3, steps=60, eval_interval=60, eval_iters=2,
                         warmup=5, device="cpu")
    train(load_corpus(tiny_text_file), config, out, progress=False, **TINY_MODEL)
    return out


@pytest.fixture
def cli_error(capsys):
    """Run the CLI on argv and hold it to the contract for bad input: exit 2, nothing on stdout, one line on
    stderr (no traceback) that contains every fragment. Returns that line."""
    from minigpt.cli import main

    def check(argv, *fragments):
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 2, err
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        for fragment in fragments:
            assert fragment in lines[0], lines[0]
        return lines[0]

    return check


@pytest.fixture
def wait_for():
    """wait_for(predicate, timeout=60): poll until predicate() is true; False if the time runs out."""
    import time

    def wait(predicate, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return False

    return wait


@pytest.fixture
def cli_without():
    """Run `minigpt` with argv in a fresh Python where importing `package` fails, as on a machine without it."""
    import subprocess
    import sys
    import textwrap

    def run(package, argv):
        script = textwrap.dedent(f"""
            import importlib.abc, sys

            def blocked(name):
                return name == {package!r} or name.startswith({package + "."!r})

            class Blocker(importlib.abc.MetaPathFinder):
                def find_spec(self, name, path, target=None):
                    if blocked(name):
                        raise ImportError({package!r} + " is not installed")

            sys.meta_path.insert(0, Blocker())
            from minigpt.cli import main
            code = main({argv!r})
            assert not any(blocked(name) for name in sys.modules), {package!r} + " was imported"
            sys.exit(code)
        """)
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)

    return run
