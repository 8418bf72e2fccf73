"""The one training path: every way of training a MiniGPT goes through `plan_training`, then `run_training`.

A plan checks every setting (cheapest first, before any data is read), loads
the data once and builds or restores the model; the run is `minigpt.training`'s
loop, with what a full run adds around it (`FullRun`): several processes
under torchrun, torch.compile, Ctrl-C and SIGTERM, one writer per checkpoint,
the metrics log, and the n-gram draft table saved with the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from minigpt import distributed
from minigpt.checkpoint import Checkpoint, load_checkpoint, warm_start
from minigpt.config import GPTConfig, TrainConfig
from minigpt.data import DataSource, load_corpus, load_recorded_corpus
from minigpt.text import EMPTY_PROMPT
from minigpt.devices import free_cores, resolve_device, usable_cores
from minigpt.draft_table import DraftTable
from minigpt.encoded import EncodedCorpus
from minigpt.errors import MiniGPTError
from minigpt.generation import generate
from minigpt.model import MiniGPT
from minigpt.subword import KINDS, check_same_kind, make_tokenizer
from minigpt.training import train_loop
from minigpt.training_plan import NonFiniteLoss, Run, TrainingPlan, TrainResult
from minigpt.training_checks import (OutputLock, StopSignals, TrainingInterrupted, check_compiler, check_model_fits,
                                     check_one_start, check_out_path, check_resumable, flag_list, metrics_path_for,
                                     resumed_settings)


def _input_paths(data, init_from, cache_dir) -> list[tuple[str, Path]]:
    """What a run reads from files, as (flag, path): an --out must be none of them."""
    paths = []
    if isinstance(data, (str, os.PathLike)) and DataSource.parse(data).kind == "path":
        paths.append(("--data", Path(data)))
    elif isinstance(data, DataSource) and data.kind == "path":
        paths.append(("--data", Path(data.name)))
    if init_from is not None:
        paths.append(("--init-from", Path(init_from.path if isinstance(init_from, Checkpoint) else init_from)))
    if cache_dir is not None:
        paths.append(("--cache-dir", Path(cache_dir)))
    return paths


def plan_training(out: str | Path, *, data: EncodedCorpus | DataSource | str | None = None,
                  config: TrainConfig | dict | None = None, resume: str | Path | None = None,
                  init_from: str | Path | Checkpoint | None = None, force: bool = False, compile: bool = False,
                  cache_dir: str | Path | None = None, text_column: str = "text", tokenizer: str | None = None,
                  vocab_size: int | None = None, **model_fields) -> TrainingPlan:
    """Check everything that needs no data (cheapest first), then read the data and build the model.

    `config`: a TrainConfig, or the settings given on the command line as a dict (with `resume` they
    override the checkpoint's stored settings, and the change is said once). `data`: a corpus already
    loaded, or what `minigpt.data.load_corpus` reads (None: a resumed run's own data, else WikiText-2).
    `tokenizer`: char, bpe (learnt from the training text, `vocab_size` tokens) or a tokenizer.json path.
    """
    out, resume = Path(out), (Path(resume) if resume is not None else None)
    check_one_start(resume, init_from)
    check_tokenizer_flags(tokenizer, vocab_size, resume)
    if init_from is not None and not isinstance(init_from, Checkpoint):
        init_from = load_checkpoint(init_from)  # vetted before the data loads
    resumed = load_checkpoint(resume) if resume is not None else None
    if resumed is not None and tokenizer is not None and _kind(tokenizer) != resumed.tokenizer.kind:
        raise MiniGPTError(f"--resume keeps {resume}'s tokenizer ({resumed.tokenizer.kind}); drop --tokenizer")
    notes = []
    if resumed is None:
        GPTConfig(vocab_size=1, **model_fields)  # an impossible shape fails here
        config = config if isinstance(config, TrainConfig) else TrainConfig(**(config or {}))
    else:
        if not isinstance(config, TrainConfig):
            config, note = resumed_settings(resume, resumed.metadata, config or {})
            notes += [note] if note else []
        if model_fields:
            notes.append(f"--resume keeps the checkpoint's architecture; ignoring {flag_list(model_fields)}")
    if config.threads is None:  # the cores free now, recorded with the run (a resumed run uses as many)
        config = dataclasses.replace(config, threads=min(torch.get_num_threads(), free_cores()))
    device = resolve_device(config.device)
    if compile:
        check_compiler(device)
    check_out_path(out, force=force, resume=resume, inputs=_input_paths(data, init_from, cache_dir))
    if resumed is not None:
        check_resumable(resumed, resume, config.steps)
    if isinstance(data, EncodedCorpus):
        corpus = data
    elif data is None and resumed is not None:
        corpus = load_recorded_corpus(resumed.metadata, cache_dir)
    else:
        corpus = load_corpus(data, cache_dir, text_column)
    if resumed is not None:
        check_same_data(corpus.source, DataSource.recorded(resumed.metadata), resume, data)
        return TrainingPlan(config, out, device, corpus, resumed.model, resumed.tokenizer, resumed.step + 1,
                            resumed.optimizer_state(), resume, compile, notes)
    if init_from is not None:
        check_same_kind(_kind(tokenizer), init_from.tokenizer.kind, "--init-from", init_from.path)
    tokenizer = make_tokenizer(tokenizer or "char", corpus, vocab_size)
    architecture = GPTConfig(tokenizer.vocab_size, **model_fields)
    check_model_fits(architecture, device)
    torch.manual_seed(config.seed)
    model = MiniGPT(architecture)
    if init_from is not None:
        notes.append(str(warm_start(model, tokenizer, init_from)))
    return TrainingPlan(config, out, device, corpus, model, tokenizer, compile=compile, notes=notes)


def train(corpus: EncodedCorpus | DataSource | str | None, config: TrainConfig, out: str | Path, *,
          progress: bool = True, resume: str | Path | None = None, force: bool = False,
          init_from: str | Path | Checkpoint | None = None, compile: bool = False,
          on_step: Callable[[dict], None] | None = None, **model_fields) -> TrainResult:
    """Train a MiniGPT on `corpus` and save it to `out` (a .safetensors checkpoint): `plan_training`, then
    `run_training`.

    `model_fields` are GPTConfig fields other than vocab_size, which the corpus
    decides. With `resume`, model, optimizer and step come from that
    checkpoint (its architecture wins over `model_fields`) and training
    continues to `config.steps`. With `init_from` (a path, or a Checkpoint
    already loaded), a new run (step 1, a fresh optimizer) starts from that
    checkpoint's tensors where they fit (`minigpt.checkpoint.warm_start`).
    With `compile`, the training step runs through torch.compile (checkpoints
    are saved from the model itself). Under torchrun, each process trains on
    its own batches and rank 0 alone logs, evaluates and saves. `on_step` is
    called with each step's record.
    """
    plan = plan_training(out, data=corpus, config=config, resume=resume, init_from=init_from, force=force,
                         compile=compile, **model_fields)
    return run_training(plan, progress=progress, on_step=on_step)


def _kind(tokenizer: str | None) -> str:
    return "char" if tokenizer in (None, "char") else "bpe"


def check_tokenizer_flags(tokenizer: str | None, vocab_size: int | None, resume) -> None:
    """--tokenizer and --vocab-size, checked before any data is read."""
    if resume is not None and vocab_size is not None:
        raise MiniGPTError(f"--resume keeps {resume}'s tokenizer; drop --vocab-size")
    if tokenizer not in (None, *KINDS) and not Path(tokenizer).is_file():
        raise MiniGPTError(f"--tokenizer {tokenizer} is not char, bpe or a tokenizer.json file; give one of those")
    if vocab_size is not None and tokenizer in (None, "char"):
        raise MiniGPTError("--vocab-size sets a BPE's vocabulary; a character model's is its text's characters: "
                           "add --tokenizer bpe or drop --vocab-size")
    if vocab_size is not None and tokenizer not in KINDS:
        raise MiniGPTError(f"--vocab-size trains a BPE; {tokenizer} already has its vocabulary: drop --vocab-size")


def check_same_data(given: DataSource, recorded: DataSource, resume: Path, data) -> None:
    """--resume continues a run on its own data (found again where it was, or moved: the same bytes); other
    data is a new run from the weights, which --init-from starts."""
    same = given.kind == recorded.kind and (given.name == recorded.name or given.kind == "path" and given.size
                                            == recorded.size) and given.config == recorded.config
    if not same:
        raise MiniGPTError(f"--resume continues {resume} on the data it was trained on ({recorded}), not {given}; "
                           f"to train its weights on other data, start a new run from them: minigpt train "
                           f"--init-from {resume} --data {data} --out NEW.safetensors")


def run_training(plan: TrainingPlan, *, progress: bool = True,
                 on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train to plan.config.steps; under torchrun every process runs this and they stop together."""
    group, device_name = distributed.join(plan.config.device)
    lock = None
    try:
        lock = OutputLock(plan.out) if group.is_main else None  # one writer per checkpoint
        if group.enabled:
            plan.device = resolve_device(device_name)
        torch.set_num_threads(plan.config.threads)
        if group.is_main:
            say_start(plan, len(plan.split("train")), group)
        with StopSignals() as signals:
            result = train_loop(plan, lambda *args: FullRun(*args, group=group, signals=signals, progress=progress),
                                progress, on_step)
    except (TrainingInterrupted, NonFiniteLoss):  # every process stops at the same step
        distributed.leave(group)
        raise
    except BaseException:  # maybe in this process alone: waiting for the others could wait forever
        distributed.leave(group, together=False)
        raise
    finally:
        if lock is not None:
            lock.release()
    distributed.leave(group)
    return result


class FullRun(Run):
    """The loop's run under `minigpt train`: rank 0 alone logs and saves, with the draft table."""

    def __init__(self, plan: TrainingPlan, model: MiniGPT, optimizer, *, group: distributed.ProcessGroup,
                 signals: StopSignals, progress: bool = True):
        super().__init__(plan, model, optimizer)
        self.group, self.signals = group, signals
        self.lines = ProgressLines(plan.config.steps, progress and group.is_main and not sys.stderr.isatty())
        self.rank, self.world_size, self.is_main = group.rank, group.world_size, group.is_main
        self.table = DraftTable(plan)
        self.log = metrics_path_for(plan.out).open("a" if plan.resume is not None else "w") if self.is_main \
            else None

    def step_model(self) -> torch.nn.Module:
        return wrap_for_training(self.model, self.group, self.plan.device, self.plan.compile)

    def agree(self, flag: bool) -> bool:
        return self.group.any(flag, device=self.plan.device)[0]

    def save(self, step: int, final: bool = False) -> None:
        if self.is_main:
            super().save(step, final)

    def draft(self, step: int, final: bool):
        tokens_per_step = self.world_size * self.plan.config.batch_size * self.model.config.block_size
        return self.table.at_save(self.model, final, step * tokens_per_step)  # the whole run's, resumed or not

    def after_step(self, record: dict, saved: bool) -> None:
        """Log the step; stop every process together after a signal, saved."""
        if self.log is not None:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()  # a log read while training runs (or after a crash) is whole up to its last line
        self.lines(record)
        if self.agree(self.signals.received is not None):
            if not saved:
                self.save(record["step"])
            raise TrainingInterrupted(self.signals.received or signal.SIGTERM, record["step"], self.plan.out)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


PROGRESS_EVERY = 30.0  # seconds between plain progress lines where no bar is drawn


class ProgressLines:
    """Off a terminal (`minigpt train 2> log`) no bar is drawn: a plain line every PROGRESS_EVERY seconds says
    what the bar would (step, loss, tokens/s, time left)."""

    def __init__(self, steps: int, enabled: bool):
        self.steps, self.enabled, self.last = steps, enabled, time.monotonic()

    def __call__(self, record: dict) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < PROGRESS_EVERY or record["step"] == self.steps:
            return
        self.last = now
        left = (self.steps - record["step"]) * record["tokens"] / record["step"] / record["tokens_per_s"]
        print(f"minigpt: step {record['step']}/{self.steps}: loss {record['loss']:.4f}, "
              f"{record['tokens_per_s']:,.0f} tokens/s, {left:,.0f} s left", file=sys.stderr, flush=True)


def wrap_for_training(model: MiniGPT, group: distributed.ProcessGroup, device: torch.device,
                      compile: bool) -> torch.nn.Module:
    """What the loop steps: the model itself, or its DDP and torch.compile wrappers (saved from the model)."""
    if group.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return _FirstCallNamed(torch.compile(model)) if compile else model


def say_start(plan: TrainingPlan, train_tokens: int, group: distributed.ProcessGroup) -> None:
    for note in plan.notes:
        print(f"minigpt: {note}", file=sys.stderr)
    characters = len(plan.corpus.split("train"))
    tokens = "" if plan.tokenizer.kind == "char" else f" in {train_tokens:,} BPE tokens"
    print(f"minigpt: {plan.model.num_parameters():,} parameters, vocab {plan.tokenizer.vocab_size}, "
          f"{characters:,} training characters{tokens} from {plan.corpus.source}, on {plan.device}"
          + (f" ({threads_said(plan.config.threads)})" if plan.device.type == "cpu" else "")
          + (f" x {group.world_size} processes" if group.enabled else "")
          + (f"; resuming at step {plan.first_step}" if plan.resume is not None else ""), file=sys.stderr)


def threads_said(threads: int) -> str:
    cores, free = len(usable_cores()), free_cores()
    busy = f"; {cores - free} of {cores} cores busy with other work" if free < cores else ""
    return f"{threads} thread{'s' if threads > 1 else ''}{busy}"


class _FirstCallNamed(torch.nn.Module):
    """torch.compile builds the step at its first call: a failure there is named in one line."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner, self.built = model, False

    def forward(self, *args):
        if self.built:
            return self.inner(*args)
        try:
            out = self.inner(*args)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise MiniGPTError(f"--compile could not build the training step ({reason}); "
                               "train without --compile") from None
        self.built = True
        return out


def sample_after_training(result: TrainResult, length: int = 300, seed: int = 0) -> str:
    """A sample from the start of a line, or from the vocabulary's first character when the text had no
    newline (the model is saved by then: a sample must not turn a finished run into an error)."""
    tokenizer = result.tokenizer
    start = "" if EMPTY_PROMPT in tokenizer else tokenizer.decode([0])
    return generate(result.model, tokenizer, start, length, temperature=0.8, seed=seed)
