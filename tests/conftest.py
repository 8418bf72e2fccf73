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

from tiny import BPE_MODEL, TINY_MODEL, TINY_TEXT, UNICODE_TEXT  # noqa: E402


@pytest.fixture(autouse=True)
def own_working_directory(tmp_path_factory, monkeypatch):
    """Every test runs in an empty folder of its own: none reads or writes the directory pytest started in
    (a `minigpt plot` run there leaves curves.png, a quick start minigpt.safetensors)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def tiny_model():
    """GPTConfig fields of the tiny model every fast test trains."""
    return dict(TINY_MODEL)


def corpus_file(tmp_path_factory, name: str, text: str):
    path = tmp_path_factory.mktemp("data") / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory):
    return corpus_file(tmp_path_factory, "tiny.txt", TINY_TEXT)


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


def _one_line_error(code: int, out: str, err: str, fragments) -> str:
    """The contract for bad input: exit 2, nothing on stdout, one line on stderr (no traceback) that contains
    every fragment. Returns that line."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    assert out == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def one_line_error():
    """one_line_error(code, out, err, *fragments): the bad-input contract for what a command returned."""
    return lambda code, out, err, *fragments: _one_line_error(code, out, err, fragments)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_checkpoint):
    """The tiny checkpoint, loaded once (model, tokenizer, its n-gram draft table)."""
    from minigpt import load_checkpoint

    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported to ONNX once."""
    from minigpt.cli import main

    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert main(["export", "--onnx", "--no-verify", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 0
    return out


@pytest.fixture
def make_engine(tiny_loaded, tiny_onnx):
    """make_engine(name): a fresh engine over the tiny model: "recompute", "kv-cache", "kv-cache-triton" (the
    Triton kernels, through the interpreter here) or "onnx"."""
    from minigpt.export.onnx_engine import OnnxEngine
    from minigpt.generation import KVCacheEngine, RecomputeEngine
    from minigpt.kernels.backends import use_attention_backend

    model = tiny_loaded.model

    def make(name):
        if name == "onnx":
            return OnnxEngine(tiny_onnx)
        if name == "recompute":
            return RecomputeEngine(model)
        use_attention_backend(model, "triton" if name == "kv-cache-triton" else "torch")
        return KVCacheEngine(model)

    yield make
    use_attention_backend(model, "auto")


@pytest.fixture
def cli_error(capsys):
    """cli_error(argv, *fragments): run the CLI in this process and hold it to the bad-input contract."""
    from minigpt.cli import main

    def check(argv, *fragments):
        code = main(argv)
        return _one_line_error(code, *capsys.readouterr(), fragments)

    return check


@pytest.fixture(scope="session")
def process_error():
    """process_error(completed_process, *fragments): the bad-input contract for a command run in its own
    process (a subprocess.CompletedProcess with text output)."""
    def check(result, *fragments):
        return _one_line_error(result.returncode, result.stdout, result.stderr, fragments)

    return check


@pytest.fixture(scope="session")
def free_port():
    """free_port(): a port on 127.0.0.1 that nothing listens on now."""
    import socket

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


@pytest.fixture(scope="session")
def tiny_flags():
    """tiny_flags(**overrides): `minigpt train` flags for the tiny model (one layer, a few steps, no sample),
    each override a flag name with underscores and its value (True for a switch, None to leave it out)."""
    defaults = dict(TINY_MODEL, num_layers=1, batch_size=8, eval_iters=1, device="cpu", sample_tokens=0)

    def flags(**overrides) -> list[str]:
        argv = []
        for name, value in {**defaults, **overrides}.items():
            flag = f"--{name.replace('_', '-')}"
            if value is not None:  # None leaves a default flag out
                argv += [flag] if value is True else [flag, str(value)]  # True: a switch such as --quiet
        return argv

    return flags


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
def cli_without(tmp_path_factory):
    """Run `minigpt` with argv in a fresh Python where importing `package` fails, as on a machine without it,
    in a folder of its own (a test never depends on what lies in the working directory)."""
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
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              cwd=tmp_path_factory.mktemp("cwd"))

    return run


@pytest.fixture(scope="session")
def unicode_file(tmp_path_factory):
    return corpus_file(tmp_path_factory, "unicode.txt", UNICODE_TEXT)


@pytest.fixture(scope="session")
def bpe_checkpoint(unicode_file, tmp_path_factory):
    """A 300-token BPE model trained through the CLI, and its ONNX export."""
    from minigpt.cli import main

    folder = tmp_path_factory.mktemp("bpe")
    out = folder / "bpe.safetensors"
    assert main(["train", "--data", str(unicode_file), "--tokenizer", "bpe", "--vocab-size", "300", "--steps", "40",
                 "--eval-interval", "40", "--learning-rate", "3e-3", "--sample-tokens", "0", "--quiet",
                 "--out", str(out), *BPE_MODEL]) == 0
    assert main(["export", "--onnx", "--checkpoint", str(out), "--out", str(folder / "bpe.onnx")]) == 0
    return out
