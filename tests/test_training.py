"""Training that never loses work: determinism, exact resume, Ctrl-C, NaN guard, safe outputs, DDP."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from minigpt import load_checkpoint
from minigpt.cli import main
from minigpt.config import TrainConfig
from minigpt.data import load_corpus
from minigpt.errors import MiniGPTError
from minigpt.train import TrainingInterrupted, train

CONFIG = TrainConfig(batch_size=8, learning_rate=3e-3, steps=24, eval_interval=8, eval_iters=2, warmup=4,
                     device="cpu")


def losses(history):
    return [record["loss"] for record in history]


def interrupt_at(step):
    def on_step(record):
        if record["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)  # the real Ctrl-C path, at a known step
    return on_step


def test_same_seed_same_run(tiny_text_file, tmp_path, tiny_model):
    corpus = load_corpus(tiny_text_file)
    first = train(corpus, CONFIG, tmp_path / "a.safetensors", progress=False, **tiny_model)
    second = train(corpus, CONFIG, tmp_path / "b.safetensors", progress=False, **tiny_model)
    assert losses(first.history) == losses(second.history)
    assert losses(first.history)[-1] < losses(first.history)[0]


def test_interrupt_then_resume_equals_one_run(tiny_text_file, tmp_path, tiny_model):
    corpus = load_corpus(tiny_text_file)
    whole = train(corpus, CONFIG, tmp_path / "whole.safetensors", progress=False, **tiny_model)

    out = tmp_path / "split.safetensors"
    with pytest.raises(TrainingInterrupted) as stop:
        train(corpus, CONFIG, out, progress=False, on_step=interrupt_at(11), **tiny_model)
    assert stop.value.step == 11 and stop.value.signum == signal.SIGINT
    assert load_checkpoint(out).step == 11
    rest = train(corpus, CONFIG, out, progress=False, resume=out)
    assert [r["step"] for r in rest.history] == list(range(12, 25))
    worst = max(abs(a - b) for a, b in zip(losses(whole.history)[11:], losses(rest.history)))
    assert worst <= 1e-6, f"max |delta loss| after resume {worst}"
    final_whole = load_checkpoint(tmp_path / "whole.safetensors").model.state_dict()
    final_split = load_checkpoint(out).model.state_dict()
    assert all(torch.allclose(final_whole[k], final_split[k], atol=1e-6) for k in final_whole)


def test_a_second_ctrl_c_during_the_save_is_ignored(tiny_text_file, tmp_path, monkeypatch, tiny_model):
    import minigpt.checkpoint as checkpoint_module

    real_write = checkpoint_module.atomic_write_bytes

    writes = []

    def impatient_write(path, data):
        writes.append(path)
        os.kill(os.getpid(), signal.SIGINT)  # pressed again while the checkpoint is being written
        real_write(path, data)

    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", impatient_write)
    out = tmp_path / "m.safetensors"
    with pytest.raises(TrainingInterrupted):
        train(load_corpus(tiny_text_file), CONFIG, out, progress=False, on_step=interrupt_at(5), **tiny_model)
    assert writes == [out]  # the save ran through the patched write, the signal in the middle of it
    assert load_checkpoint(out).step == 5


def test_resume_refuses_a_finished_or_stateless_checkpoint(tiny_text_file, tiny_checkpoint, tmp_path):
    corpus = load_corpus(tiny_text_file)
    finished = load_checkpoint(tiny_checkpoint).step
    with pytest.raises(MiniGPTError, match=f"at step {finished} already"):
        train(corpus, TrainConfig(steps=finished, device="cpu"), tmp_path / "x.safetensors", resume=tiny_checkpoint)
    from minigpt import save_checkpoint

    stateless = tmp_path / "stateless.safetensors"
    checkpoint = load_checkpoint(tiny_checkpoint)
    save_checkpoint(stateless, checkpoint.model, checkpoint.tokenizer, step=3)
    with pytest.raises(MiniGPTError, match="no optimizer state"):
        train(corpus, CONFIG, tmp_path / "y.safetensors", resume=stateless)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_text_file, tmp_path, capsys,
                                                                  tiny_flags):
    out = tmp_path / "m.safetensors"
    flags = ["--data", str(tiny_text_file), "--out", str(out), *tiny_flags(num_layers=2, eval_interval=5, quiet=True)]
    assert main(["train", *flags, "--steps", "5"]) == 0
    good = out.read_bytes()
    capsys.readouterr()
    code = main(["train", *flags, "--steps", "40", "--learning_rate", "1e9", "--grad_clip", "0", "--warmup", "0",
                 "--force"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "the loss became" in line and "at step" in line
    assert out.read_bytes() == good


def test_an_existing_checkpoint_is_never_replaced_unless_forced(tiny_text_file, tiny_checkpoint, tmp_path,
                                                                capsys, tiny_flags):
    out = tmp_path / "other.safetensors"
    out.write_bytes(tiny_checkpoint.read_bytes())
    flags = ["--data", str(tiny_text_file), "--out", str(out),
             *tiny_flags(num_layers=2, batch_size=None, steps=2, quiet=True)]
    for architecture in ([], ["--embed_dim", "64"]):  # the same model or another: neither is overwritten
        assert main(["train", *flags, *architecture]) == 2
        line = capsys.readouterr().err.strip()
        assert "already holds a trained model" in line and "--force" in line and f"--resume {out}" in line
        assert out.read_bytes() == tiny_checkpoint.read_bytes()
    assert main(["train", *flags, "--embed_dim", "64", "--force"]) == 0
    assert load_checkpoint(out).model.config.embed_dim == 64


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_saves_and_exits_on_a_signal(tiny_text_file, tmp_path, signum, code, wait_for, tiny_flags):
    out = tmp_path / "m.safetensors"
    process = subprocess.Popen(
        [sys.executable, "-m", "minigpt", "train", "--data", str(tiny_text_file), "--out", str(out),
         *tiny_flags(num_layers=2, steps=100000, eval_interval=100000, eval_iters=None, sample_tokens=None,
                     quiet=True)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "m.metrics.jsonl"
    assert wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0), "training never started"
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert "Resume with: minigpt train --resume" in err and "Traceback" not in err
    saved = load_checkpoint(out)
    assert saved.step >= 1 and saved.optimizer_state() is not None


def test_a_writer_killed_mid_write_leaves_the_old_file(tmp_path, wait_for):
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"the good old checkpoint")
    writer = textwrap.dedent(f"""
        import os, time
        from minigpt.checkpoint import atomic_write_bytes
        os.fsync = lambda fd: time.sleep(60)  # a slow disk: the kill lands before the rename
        atomic_write_bytes({str(target)!r}, b"new" * 5_000_000)
    """)
    process = subprocess.Popen([sys.executable, "-c", writer])
    assert wait_for(lambda: any(p.name.endswith(".tmp") and p.stat().st_size > 0 for p in tmp_path.iterdir()))
    process.kill()
    process.wait(timeout=30)
    assert target.read_bytes() == b"the good old checkpoint"


@pytest.mark.slow
def test_two_processes_train_with_ddp_on_gloo(tiny_text_file, tmp_path, free_port):
    """torchrun starts two ranks; each saves what it holds, and the checkpoint equals both."""
    out = tmp_path / "ddp.safetensors"
    script = tmp_path / "ddp_rank.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from safetensors.torch import save_file
        from minigpt.config import TrainConfig
        from minigpt.data import load_corpus
        from minigpt.train import train

        config = TrainConfig(batch_size=8, learning_rate=3e-3, steps=12, eval_interval=12, eval_iters=2,
                             warmup=2, device="cpu")
        result = train(load_corpus({str(tiny_text_file)!r}), config, {str(out)!r}, progress=False,
                       block_size=16, embed_dim=32, num_heads=2, num_layers=2)
        weights = {{k: v.contiguous() for k, v in result.model.state_dict().items() if k != "lm_head.weight"}}
        save_file(weights, os.path.join({str(tmp_path)!r}, "rank" + os.environ["RANK"] + ".safetensors"))
        print("losses", [round(r["loss"], 4) for r in result.history], flush=True)
    """))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", str(script)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    saved = load_checkpoint(out).model.state_dict()
    for rank in (0, 1):
        held = load_file(tmp_path / f"rank{rank}.safetensors")
        assert all(torch.equal(held[k], saved[k]) for k in held), f"rank {rank} differs from the checkpoint"
    records = [json.loads(line) for line in (tmp_path / "ddp.metrics.jsonl").read_text().splitlines()]
    assert len(records) == 12  # rank 0 alone logs
    assert records[-1]["loss"] < records[0]["loss"]
    assert all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.slow
def test_minigpt_train_runs_under_torchrun(tiny_text_file, tmp_path, free_port, tiny_flags):
    out = tmp_path / "m.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", "-m", "minigpt", "train", "--data", str(tiny_text_file),
         "--out", str(out), *tiny_flags(steps=6, eval_interval=6, quiet=True, sample_tokens=20)],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stderr
    assert result.stderr.count("trained to step 6") == 1  # rank 0 alone reports
    assert load_checkpoint(out).step == 6


@pytest.mark.slow
def test_a_user_error_under_torchrun_is_said_once(tiny_text_file, tmp_path, free_port, tiny_flags):
    """Every process meets the bad --out; one of them says so (the error is raised before any process group)."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", "-m", "minigpt", "train", "--data", str(tiny_text_file),
         "--out", str(tiny_text_file), *tiny_flags(steps=2)], capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert result.stderr.count("minigpt train: error:") == 1, result.stderr[-3000:]
    assert "is also this command's --data" in result.stderr


def test_resume_says_which_architecture_flags_it_ignores(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "continued.safetensors"
    step = load_checkpoint(tiny_checkpoint).step
    assert main(["train", "--resume", str(tiny_checkpoint), "--out", str(out), "--steps", str(step + 2),
                 "--embed_dim", "64", "--eval_iters", "1", "--quiet", "--sample_tokens", "0", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "ignoring --embed-dim 64" in err
    assert f"training settings, except --steps {step + 2}, --eval-iters 1\n" in err  # --device cpu: as stored
    continued = load_checkpoint(out)
    assert continued.step == step + 2 and continued.model.config.embed_dim == 32


def test_init_from_grows_a_deeper_model_from_a_shallower_one(tiny_text_file, tiny_checkpoint, tmp_path, capsys,
                                                             tiny_flags):
    out = tmp_path / "deeper.safetensors"
    assert main(["train", "--data", str(tiny_text_file), "--out", str(out), "--init-from", str(tiny_checkpoint),
                 *tiny_flags(num_layers=3, batch_size=None, steps=1, learning_rate=1e-9, warmup=0, quiet=True)]) == 0
    line = next(line for line in capsys.readouterr().err.splitlines() if "--init-from" in line)
    assert "blocks.2.attn.qkv.weight (not in the checkpoint)" in line and "skipped 12" in line
    source, grown = load_checkpoint(tiny_checkpoint).model.state_dict(), load_checkpoint(out).model.state_dict()
    for name in ("tok_emb.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc.weight", "ln_final.weight"):
        assert torch.allclose(grown[name], source[name], atol=1e-6), name  # one step at lr 1e-9 moves nothing
    assert load_checkpoint(out).step == 1  # a new run, not a resumed one


def test_init_from_a_model_it_fits_nothing_of_is_refused(tiny_text_file, tiny_checkpoint, tmp_path, tiny_flags,
                                                         process_error):
    """A wider model shares no tensor shape with the checkpoint: "copied 0" and training on was a fresh start
    nobody asked for. Through the installed command, in a fresh process; nothing is written."""
    out = tmp_path / "wide.safetensors"
    result = subprocess.run([sys.executable, "-m", "minigpt", "train", "--data", str(tiny_text_file), "--out",
                             str(out), "--init-from", str(tiny_checkpoint), *tiny_flags(embed_dim=64, steps=2)],
                            capture_output=True, text=True, timeout=300)
    process_error(result, f"--init-from {tiny_checkpoint} fits nothing of this model",
                  "tok_emb.weight: shape (29, 32) in the checkpoint, (29, 64) here")
    assert not out.exists()


def test_init_from_a_corpus_with_another_vocabulary_copies_embedding_rows_by_character(tiny_checkpoint, tmp_path):
    from minigpt.checkpoint import warm_start
    from minigpt.config import GPTConfig
    from minigpt.model import MiniGPT
    from minigpt.tokenizer import CharTokenizer

    source = load_checkpoint(tiny_checkpoint)
    tokenizer = CharTokenizer("the quick brown fox!?ZQ")  # some characters old, some new
    model = MiniGPT(GPTConfig(tokenizer.vocab_size, block_size=16, embed_dim=32, num_heads=2, num_layers=2))
    fresh = model.tok_emb.weight.detach().clone()
    report = warm_start(model, tokenizer, source)
    shared = [c for c in tokenizer.chars if c in source.tokenizer.chars]
    assert report.characters == f"{len(shared)} of {tokenizer.vocab_size} characters"
    assert "tok_emb.weight" in report.copied
    for char in tokenizer.chars:
        row = model.tok_emb.weight[tokenizer.encode(char)[0]]
        if char in shared:
            assert torch.equal(row, source.model.tok_emb.weight[source.tokenizer.encode(char)[0]]), char
        else:
            assert torch.equal(row, fresh[tokenizer.encode(char)[0]]), char  # a new character keeps its init
    assert torch.equal(model.lm_head.weight, model.tok_emb.weight)  # the tied head follows


def test_init_from_and_resume_are_one_or_the_other(tiny_checkpoint, tmp_path, cli_error):
    cli_error(["train", "--resume", str(tiny_checkpoint), "--init-from", str(tiny_checkpoint),
               "--out", str(tmp_path / "x.safetensors")], "give one of them")
    cli_error(["train", "--init-from", str(tmp_path / "absent.safetensors"), "--out", str(tmp_path / "x.safetensors")],
              "checkpoint not found")


@pytest.mark.slow
def test_compile_trains_and_saves_a_checkpoint_that_loads_without_it(tiny_text_file, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "compiled.safetensors"
    assert main(["train", "--data", str(tiny_text_file), "--out", str(out), "--compile", "--block-size", "16",
                 "--embed-dim", "32", "--num-heads", "2", "--num-layers", "1", "--batch-size", "8", "--steps", "3",
                 "--eval-iters", "1", "--quiet", "--sample-tokens", "0", "--device", "cpu"]) == 0, \
        capsys.readouterr().err
    with safe_open(out, framework="pt") as saved:
        assert not any(key.startswith(("_orig_mod.", "module.")) for key in saved.keys())
    assert load_checkpoint(out).step == 3


@pytest.mark.slow
def test_compile_without_a_cpp_compiler_is_a_one_line_error(tiny_text_file, tmp_path):
    result = subprocess.run([sys.executable, "-m", "minigpt", "train", "--data", str(tiny_text_file), "--out",
                             str(tmp_path / "m.safetensors"), "--compile", "--device", "cpu"],
                            capture_output=True, text=True, timeout=120,
                            env={"PATH": str(tmp_path), "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "needs a C++ compiler" in result.stderr and "without --compile" in result.stderr
    assert not (tmp_path / "m.safetensors").exists()
