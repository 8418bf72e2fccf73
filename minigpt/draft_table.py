"""The n-gram draft table a training run saves with its model: a save callback of `minigpt.train`.

The table (`minigpt.drafts.NGramDraft`) is what speculative decoding guesses
from. Until the last step it counts the training text itself (made once, at
the first save); the last save counts what the finished model says after each
character of the start of that text (`model_picks`), since a guess is right
when it is what the model will say. Reading costs forward passes, so a run
reads at most a share of what it trained on: a short experiment's end stays
short, and a real run reads DISTILLED_CHARACTERS.
"""

from __future__ import annotations

import numpy as np
import torch

from minigpt.drafts import CANDIDATES, NGramDraft
from minigpt.model import MiniGPT


class DraftTable:
    """The table a run saves, made when a save first needs it."""

    def __init__(self, plan):
        self.plan, self.draft = plan, None

    def at_save(self, model: MiniGPT, final: bool, trained_tokens: int) -> NGramDraft:
        """The table to save with the model after `trained_tokens` tokens of training."""
        plan, vocab_size = self.plan, self.plan.tokenizer.vocab_size
        if final:
            read = max(MIN_DISTILLED, min(DISTILLED_CHARACTERS, trained_tokens // DISTILLED_SHARE))
            ids = plan.split("train")[:read]
            picks, likely, chances = model_picks(model, ids, plan.device)
            self.draft = NGramDraft.build(ids[:len(picks)], vocab_size, picks=picks, likely=(likely, chances))
        elif self.draft is None:
            self.draft = NGramDraft.build(plan.split("train")[:DISTILLED_CHARACTERS], vocab_size)
        return self.draft


# How much of the training text the finished model reads for its table, at most (what other amounts guessed is
# in bench/README.md, "Speculative decoding"), at least, and at most what share of the tokens the run trained on.
DISTILLED_CHARACTERS = 200_000
MIN_DISTILLED = 4_096
DISTILLED_SHARE = 4
PICK_WINDOWS = 64  # block-long windows a forward pass of `model_picks` reads


@torch.inference_mode()
def model_picks(model: MiniGPT, ids: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the model says after each character of `ids`, reading it in block-long windows: (picks, likely,
    chances), where for j >= 1 picks[j] is its greedy pick at j from the text before (within its window),
    likely[j] its CANDIDATES likeliest characters there and chances[j] their probabilities (row 0: ids[0],
    certain). Cut to the whole windows (and one), or ids itself, certain, when it is shorter than a block.

    Its n-gram draft table counts these, not the text's characters: a draft is right when it guesses what
    the model will say, and the model's greedy text drifts from the corpus."""
    block, text = model.config.block_size, np.asarray(ids, dtype=np.int64)
    windows = (len(text) - 1) // block if len(text) > block else 0
    picks = text[:windows * block + 1].copy() if windows else text.copy()
    width = min(CANDIDATES, model.config.vocab_size)
    likely = np.zeros((len(picks), width), dtype=np.int64)
    chances = np.zeros((len(picks), width), dtype=np.float32)
    likely[:, 0], chances[:, 0] = picks, 1.0  # what the model read no window for: the text, certain
    training = model.training
    model.eval()
    try:
        for first in range(0, windows, PICK_WINDOWS):
            count = min(PICK_WINDOWS, windows - first)
            read = torch.from_numpy(text[first * block:(first + count) * block].reshape(count, block))
            logits = model(read.to(device))[0].reshape(count * block, -1).float()
            top = torch.softmax(logits, dim=-1).topk(width, dim=-1)
            said = slice(first * block + 1, (first + count) * block + 1)
            picks[said] = logits.argmax(-1).cpu().numpy()
            likely[said], chances[said] = top.indices.cpu().numpy(), top.values.cpu().numpy()
    finally:
        model.train(training)
    return picks, likely, chances
