"""Scoring text: the log-probability the model gives each of its tokens (numpy alone, any engine).

`minigpt eval`, the server's `echo` + `logprobs` and lm-eval through the
server read a text the same way, in consecutive windows of block_size tokens
(each window's first token predicted from that token alone), so a text's
log-likelihood is one number whichever asks. A window is one `extend` call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from minigpt.decoding import Engine
from minigpt.rows import runs_of_equal


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """The model's own log-probabilities (temperature 1), in float64 over the last axis."""
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits, axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def windows(length: int, block_size: int) -> list[tuple[int, int]]:
    """The [start, end) input spans that score tokens 1 .. length-1: span [s, e) predicts tokens s+1 .. e."""
    return [(start, min(start + block_size, length - 1)) for start in range(0, length - 1, block_size)]


def score(engine: Engine, ids: Sequence[int], *, first_row: int = 0, rows: int = 1,
          each_window: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
    """The (N-1,) log-probability of each token of `ids` after the first, float64, running up to `rows`
    windows at a time in the engine's rows first_row .. first_row+rows-1 (which it overwrites: give rows no
    sequence is using). each_window(start, logprobs), if given, sees every window's (length, V) log-probs."""
    ids = np.asarray(ids, dtype=np.int64)
    spans = windows(len(ids), engine.block_size)
    logprobs = np.zeros(max(len(ids) - 1, 0))
    lengths = np.array([end - start for start, end in spans])
    for first, count in runs_of_equal(lengths):  # every window but the last is full: they run `rows` at a time
        for batch in range(first, first + count, rows):
            chunk = spans[batch:min(batch + rows, first + count)]
            inputs = np.stack([ids[start:end] for start, end in chunk])
            scores = log_softmax(engine.extend(inputs, np.zeros(len(chunk), dtype=np.int64), first_row))
            for window, (start, end) in zip(scores, chunk):
                logprobs[start:end] = window[np.arange(end - start), ids[start + 1:end + 1]]
                if each_window is not None:
                    each_window(start, window)
    return logprobs
