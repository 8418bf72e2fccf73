"""What the training loop (`minigpt.training.train_loop`) is given and what it calls around each step.

`minigpt.train` checks a run's settings, reads its data and builds or restores
its model into a `TrainingPlan`; the loop trains it and calls the plan's `Run`
at each step and save. The plain `Run` here is one process that saves the
checkpoint; `minigpt.train.FullRun` adds several processes, torch.compile,
Ctrl-C, the metrics log and the draft table.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minigpt.checkpoint import save_checkpoint
from minigpt.config import TrainConfig
from minigpt.errors import MiniGPTError
from minigpt.model import MiniGPT


class NonFiniteLoss(MiniGPTError):
    """The loss became inf or NaN; nothing from that step on was saved."""


@dataclass
class TrainingPlan:
    """A run, checked and loaded (`minigpt.train.plan_training`): nothing about it can fail any more."""

    config: TrainConfig
    out: Path
    device: torch.device
    corpus: object  # a `minigpt.encoded.EncodedCorpus`
    model: MiniGPT
    tokenizer: object  # a `minigpt.tokenizer.CharTokenizer` or `minigpt.subword.BPETokenizer`
    first_step: int = 1
    optimizer_state: dict | None = None
    resume: Path | None = None
    compile: bool = False
    notes: list[str] = field(default_factory=list)  # said once before training starts

    def split(self, name: str) -> np.ndarray:
        return self.tokenizer.corpus_ids(self.corpus, name, self.model.config.block_size)


@dataclass
class TrainResult:
    model: MiniGPT
    tokenizer: object
    history: list[dict] = field(default_factory=list)  # one record per step, eval numbers where evaluated
    tokens_per_s: float = 0.0
    wall_s: float = 0.0


class Run:
    """What the loop asks of the run around it: here one process that saves the checkpoint."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self, plan: TrainingPlan, model: MiniGPT, optimizer: torch.optim.Optimizer):
        self.plan, self.model, self.optimizer = plan, model, optimizer

    def step_model(self) -> torch.nn.Module:  # what the loop steps: the model, or a wrapper of it
        return self.model

    def agree(self, flag: bool) -> bool:  # whether any process raised `flag`: all decide alike
        return flag

    def check_finite(self, loss: float, step: int) -> None:
        if self.agree(not math.isfinite(loss)):  # on any process: all stop
            out, clip = self.plan.out, self.plan.config.grad_clip
            kept = f"the checkpoint {out} is left as it was" if out.exists() else "nothing was saved"
            advice = "lower --learning-rate" + (" or --grad-clip" if clip else ", or clip the gradient with "
                                                                               "--grad-clip 1")
            raise NonFiniteLoss(f"the loss became {loss} at step {step}; {kept}: {advice} and try again")

    def save(self, step: int, final: bool = False) -> None:
        plan = self.plan
        save_checkpoint(plan.out, self.model, plan.tokenizer, step=step, data=plan.corpus.source,
                        optimizer=self.optimizer, draft=self.draft(step, final),
                        train_config=dataclasses.asdict(plan.config))

    def draft(self, step: int, final: bool):  # what speculative decoding will guess from, saved with the model
        return None

    def after_step(self, record: dict, saved: bool) -> None:
        """Each step's record; a run may stop here (saving first when the step did not)."""

    def close(self) -> None:  # the loop is over, or failed
        pass
