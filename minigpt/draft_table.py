"""The n-gram draft table a training run saves with its model: a save callback of `minigpt.train`.

The table (`minigpt.drafts.NGramDraft`) is what speculative decoding guesses
from. Until the last step it counts the training text itself (made once, at
the first save); the last save counts what the finished model says after each
character of the start of that text (`model_picks`), since a guess is right
when it is what the model will say. Reading costs forward passes, so a run
reads at most a share of what it trained on: a short experiment's end stays
short, and a real run reads DISTILLED_CHARACTERS.

How long a context the table reads and how sure its guesses must be are
chosen then too (`choose_settings`): the model continues prompts from the
validation split, text it never trained on, and the table takes the choice
that would have speculated on those continuations at the least cost. Text
the table knows well wants long contexts; text it does not, short ones.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from minigpt.decoding import generate_rows
from minigpt.drafts import CANDIDATES, NGramDraft
from minigpt.generation import KVCacheEngine
from minigpt.model import MiniGPT
from minigpt.sampling import Sampler
from minigpt.settings import DRAFT_TOKENS
from minigpt.speculative import agreeing


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
            table = NGramDraft.build(ids[:len(picks)], vocab_size, max(ORDERS), picks, (likely, chances))
            self.draft = choose_settings(table, model, plan.split("valid"))
        elif self.draft is None:
            self.draft = NGramDraft.build(plan.split("train")[:DISTILLED_CHARACTERS], vocab_size)
        return self.draft


# How much of the training text the finished model reads for its table, at most (what other amounts guessed is
# in bench/README.md, "Speculative decoding"), at least, and at most what share of the tokens the run trained on.
DISTILLED_CHARACTERS = 200_000
MIN_DISTILLED = 4_096
DISTILLED_SHARE = 4
PICK_WINDOWS = 64  # block-long windows a forward pass of `model_picks` reads
# What `choose_settings` tries (bench/README.md, "Speculative decoding"), and on how much text: this many prompts of
# this many characters, each continued this far (within the block).
ORDERS, CONFIDENCES = (3, 4, 5, 6), (0.2, 0.3, 0.45)
CHOOSING_PROMPTS, PROMPT_CHARACTERS, CONTINUED = 64, 40, 88
# A verify step's cost grows with the tokens it writes: each costs about this share of what a step costs anyway
# (the default model on a CPU: ~12 us a token beside ~140 us a step, the loop's Python included).
WRITTEN_TOKEN_COST = 0.086


@contextmanager
def evaluating(model: MiniGPT):
    """The model in eval mode (no dropout) for the block, then back in the mode it was in."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


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
    with evaluating(model):
        for first in range(0, windows, PICK_WINDOWS):
            count = min(PICK_WINDOWS, windows - first)
            read = torch.from_numpy(text[first * block:(first + count) * block].reshape(count, block))
            logits = model(read.to(device))[0].reshape(count * block, -1).float()
            top = torch.softmax(logits, dim=-1).topk(width, dim=-1)
            said = slice(first * block + 1, (first + count) * block + 1)
            picks[said] = logits.argmax(-1).cpu().numpy()
            likely[said], chances[said] = top.indices.cpu().numpy(), top.values.cpu().numpy()
    return picks, likely, chances


def choose_settings(table: NGramDraft, model: MiniGPT, valid: np.ndarray) -> NGramDraft:
    """Of `table` shortened to each of ORDERS and CONFIDENCES, the one whose greedy guesses would cost least
    (`speculation_cost`) on the model's own greedy continuations of prompts from `valid`; `table` itself when
    `valid` is too short to prompt from."""
    block = model.config.block_size
    prompt = min(PROMPT_CHARACTERS, block // 2)
    if len(valid) <= prompt:
        return table
    # Evenly spread, each midway in its share of the split (so never where an evenly spread set of prompts
    # starting at the split's first character, as the benchmarks', would start).
    starts = np.unique(((np.arange(CHOOSING_PROMPTS) + 0.5) * (len(valid) - prompt) / CHOOSING_PROMPTS).astype(int))
    prompts = [valid[start:start + prompt].tolist() for start in starts]
    with evaluating(model):
        continued = list(generate_rows(KVCacheEngine(model), prompts, min(CONTINUED, block - prompt),
                                       Sampler(temperature=0)))
    texts = [row + column.tolist() for row, column in zip(prompts, np.stack(continued, axis=1))]
    # A large vocabulary's table may hold shorter contexts than ORDERS names (`minigpt.drafts.max_order`).
    orders = sorted({min(order, table.order) for order in ORDERS})
    choices = [table.shortened(order, confident) for order in orders for confident in CONFIDENCES]
    return min(choices, key=lambda choice: speculation_cost(choice, texts, prompt))  # a tie: the shorter


def speculation_cost(draft: NGramDraft, texts: list[list[int]], start: int) -> float:
    """What greedy speculative decoding with `draft` would spend on `texts` (the model's own greedy text after
    each prompt of `start` tokens), in verify steps: a step writes the pending token and the guesses (each
    written token costs WRITTEN_TOKEN_COST of a step) and keeps the guesses the text goes on with."""
    steps = written = 0
    for text in texts:
        position = start  # of the pending token: the first the model said
        while position < len(text) - 1:
            guesses = draft.propose(np.asarray(text[:position + 1]), DRAFT_TOKENS)
            kept = agreeing(guesses, text[position + 1:])
            steps, written, position = steps + 1, written + 1 + len(guesses), position + kept + 1
    return steps + WRITTEN_TOKEN_COST * written
