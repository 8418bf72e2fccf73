"""Scoring text: the log-probability the model gives each of its tokens (numpy alone, any engine).

`minigpt eval`, the server's `echo` + `logprobs` and lm-eval through the
server read a text the same way, in consecutive windows of block_size tokens
(each window's first token predicted from that token alone), so a text's
log-likelihood is one number whichever asks. A window is one `extend` call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from minigpt.decoding import Engine
from minigpt.rows import runs_of_equal


@dataclass
class TokenScores:
    """Of each token after the first: its log-probability and, when asked for, the `top` likeliest tokens."""

    logprobs: np.ndarray  # (N-1,) float64: log p(ids[i+1] | the window up to it)
    top_ids: np.ndarray  # (N-1, top) int64, likeliest first
    top_logprobs: np.ndarray  # (N-1, top) float64

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """The model's own log-probabilities (temperature 1), in float64 over the last axis."""
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits, axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top_tokens(logprobs: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The `top` likeliest ids of each row of (..., V) log-probabilities and theirs, likeliest first."""
    if top == 0:
        return (np.zeros(logprobs.shape[:-1] + (0,), dtype=np.int64),
                np.zeros(logprobs.shape[:-1] + (0,), dtype=np.float64))
    ids = np.argpartition(-logprobs, top - 1, axis=-1)[..., :top] if top < logprobs.shape[-1] else \
        np.broadcast_to(np.arange(logprobs.shape[-1]), logprobs.shape)
    chosen = np.take_along_axis(logprobs, ids, axis=-1)
    order = np.argsort(-chosen, axis=-1, kind="stable")  # a partition is unordered: sort the few it keeps
    return np.take_along_axis(ids, order, axis=-1), np.take_along_axis(chosen, order, axis=-1)


def windows(length: int, block_size: int) -> list[tuple[int, int]]:
    """The [start, end) input spans that score tokens 1 .. length-1: span [s, e) predicts tokens s+1 .. e."""
    return [(start, min(start + block_size, length - 1)) for start in range(0, length - 1, block_size)]


def score(engine: Engine, ids: Sequence[int], *, first_row: int = 0, rows: int = 1, top: int = 0) -> TokenScores:
    """Score every token of `ids` after the first, running up to `rows` windows at a time in the engine's rows
    first_row .. first_row+rows-1 (which it overwrites: give rows no sequence is using)."""
    ids = np.asarray(ids, dtype=np.int64)
    spans = windows(len(ids), engine.block_size)
    logprobs = np.zeros(max(len(ids) - 1, 0))
    top_ids, top_logprobs = np.zeros((len(logprobs), top), dtype=np.int64), np.zeros((len(logprobs), top))
    lengths = np.array([end - start for start, end in spans])
    for first, count in runs_of_equal(lengths):  # every window but the last is full: they run `rows` at a time
        for batch in range(first, first + count, rows):
            chunk = spans[batch:min(batch + rows, first + count)]
            inputs = np.stack([ids[start:end] for start, end in chunk])
            scores = log_softmax(engine.extend(inputs, np.zeros(len(chunk), dtype=np.int64), first_row))
            for window, (start, end) in zip(scores, chunk):
                logprobs[start:end] = window[np.arange(end - start), ids[start + 1:end + 1]]
                top_ids[start:end], top_logprobs[start:end] = top_tokens(window, top)
    return TokenScores(logprobs, top_ids, top_logprobs)
