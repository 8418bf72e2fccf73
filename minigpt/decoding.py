"""The decoding loop every engine shares, in numpy alone (no torch import).

An engine turns token ids into next-token logits in two steps, as inference
servers do: `prefill` starts rows of a batch from their prompts, `decode`
extends every row by one token. Rows are independent sequences, each at its
own length (a ragged batch): a row can be prefilled while the others keep
their caches, which is how sequences join a running batch. The loop here
(with its policy past the block size) and the `Sampler` are the same for
every engine, so engines can only differ in the logits they compute, and
they agree token for token.

Past the block size: learned positions stop at block_size, and a cache of
keys computed at positions 0..block_size-1 cannot slide (every key would
need its position changed). So when a row's context is full, that row alone
restarts from its most recent `block_size // 2` tokens: all but the newest
are prefilled into the row, and the newest joins the batch's next decode
step like any other row's. One prefill of half a block every half block,
instead of a full recompute every step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from minigpt.errors import MiniGPTError
from minigpt.sampling import Sampler
from minigpt.tokenizer import CharTokenizer

EMPTY_PROMPT = "\n"  # what an empty prompt starts from: the start of a new line


class Engine(Protocol):
    block_size: int

    def start(self, batch_size: int) -> None:
        """Make room for `batch_size` rows, all empty."""

    def prefill(self, ids: np.ndarray, first_row: int = 0) -> np.ndarray:
        """Restart rows first_row .. first_row+n-1 from (n, T) ids, 0 <= T <= block_size; return (n, V)
        next-token logits (T = 0 empties the rows and returns nothing useful)."""

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Append (n,) ids to rows 0 .. n-1, each at its own position; return (n, V) next-token logits,
        valid until the next decode."""

    def move_row(self, source: int, target: int) -> None:
        """Make row `target` hold what row `source` holds (its cache and length), as `Rows.remove` needs."""


def generate_tokens(engine: Engine, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler,
                    num_samples: int = 1) -> Iterator[np.ndarray]:
    """Yield the (num_samples,) ids chosen at each step, all samples decoded as one batch."""
    return generate_rows(engine, [prompt_ids] * num_samples, max_new_tokens, sampler)


def generate_rows(engine: Engine, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  sampler: Sampler) -> Iterator[np.ndarray]:
    """Yield the (rows,) ids chosen at each step for a batch of prompts of any lengths (one row each)."""
    check_lengths(max_new_tokens, len(prompts))
    if any(len(prompt) == 0 for prompt in prompts):
        raise MiniGPTError("every prompt needs at least one token")
    return _decode(engine, prompts, max_new_tokens, sampler)


def _decode(engine: Engine, prompts: Sequence[Sequence[int]], max_new_tokens: int,
            sampler: Sampler) -> Iterator[np.ndarray]:
    if max_new_tokens == 0:
        return
    rows = Rows(engine, len(prompts))
    logits = rows.add(prompts)
    streams = sampler.streams(len(prompts))
    for step in range(max_new_tokens):
        next_ids = sampler(logits, streams)
        yield next_ids
        if step + 1 == max_new_tokens:
            break
        logits = rows.decode(next_ids)


class Rows:
    """The sequences in an engine's batch, packed into rows 0 .. count-1, and the policy past the block size.

    Sequences join (`add`) and leave (`remove`) between steps; `decode` extends
    every one by a token. Continuous batching is this and nothing more.
    """

    def __init__(self, engine: Engine, capacity: int):
        self.engine, self.capacity = engine, capacity
        self.block, self.keep = engine.block_size, max(1, engine.block_size // 2)
        self.count = 0
        self.lengths = np.zeros(capacity, dtype=np.int64)  # tokens in each row's cache
        self.tokens = np.zeros((capacity, self.block), dtype=np.int64)  # and which they are
        self.room = self.block  # decode steps before some row is full: rows are looked at only then
        self._all_rows = np.arange(capacity)
        engine.start(capacity)

    def add(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Prefill prompts into the next free rows; return their (n, V) next-token logits."""
        if self.count + len(prompts) > self.capacity:
            raise MiniGPTError(f"{self.count} rows are in use; {len(prompts)} more exceed the capacity of "
                               f"{self.capacity}")
        first = self.count
        windows = [np.asarray(prompt, dtype=np.int64)[-self.block:] for prompt in prompts]  # a long prompt is
        lengths = np.array([len(window) for window in windows])                             # read through its end
        logits = []
        for start, count in runs_of_equal(lengths):  # rows of one length prefill together
            rows = slice(first + start, first + start + count)
            self.tokens[rows, :lengths[start]] = np.stack(windows[start:start + count])
            logits.append(self.engine.prefill(self.tokens[rows, :lengths[start]], rows.start))
        self.lengths[first:first + len(prompts)] = lengths
        self.count += len(prompts)
        self.room = min(self.room, self.block - int(lengths.max()))
        return np.concatenate(logits)

    def remove(self, row: int) -> None:
        """Free a row; the last row moves into it, so rows stay packed (any row index may change)."""
        last = self.count - 1
        if row != last:
            self.engine.move_row(last, row)
            self.lengths[row], self.tokens[row] = self.lengths[last], self.tokens[last]
        self.count -= 1

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Append (count,) ids, one to each row; return the (count, V) next-token logits."""
        if self.room == 0:  # full rows restart (see the module's docstring)
            self._restart_full_rows(ids)
        self.tokens[self._all_rows[:self.count], self.lengths[:self.count]] = ids
        self.lengths[:self.count] += 1
        self.room -= 1
        return self.engine.decode(ids)

    def _restart_full_rows(self, ids: np.ndarray) -> None:
        full = np.flatnonzero(self.lengths[:self.count] == self.block)
        # Neighbouring full rows (the samples of one prompt, say) restart in one prefill.
        for first, count in runs_of_equal(full - np.arange(len(full))):
            rows = slice(full[first], full[first] + count)
            kept = self.tokens[rows, self.block - self.keep + 1:].copy()  # the newest token comes with the decode
            self.engine.prefill(kept, rows.start)
            self.tokens[rows, :kept.shape[1]] = kept
            self.lengths[rows] = kept.shape[1]
        self.room = self.block - int(self.lengths[:self.count].max(initial=0))


def runs_of_equal(values: np.ndarray) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of equal neighbouring values."""
    first = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[first]:
            yield first, i - first
            first = i


def check_prefill(ids: np.ndarray, first_row: int, batch_size: int, block_size: int) -> None:
    """The checks every engine's `prefill` makes: the rows exist and the prompt fits the block."""
    rows, length = ids.shape
    if not 0 <= first_row <= first_row + rows <= batch_size:
        raise MiniGPTError(f"rows {first_row}..{first_row + rows - 1} are outside the batch of {batch_size} "
                           "rows; call start() with a larger batch")
    if length > block_size:
        raise MiniGPTError(f"a prefill of {length} tokens exceeds block_size {block_size}; "
                           "keep the last block_size tokens")


def check_lengths(max_new_tokens: int, num_samples: int) -> None:
    if max_new_tokens < 0:
        raise MiniGPTError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_samples < 1:
        raise MiniGPTError(f"num_samples must be >= 1, got {num_samples}")


def prompt_ids(tokenizer: CharTokenizer, prompt: str) -> list[int]:
    """Encode a prompt; an empty one starts from a newline."""
    if not prompt:
        if EMPTY_PROMPT not in tokenizer.chars:
            raise MiniGPTError("the prompt is empty and the vocabulary has no newline to start from; "
                               "give a prompt with --prompt")
        prompt = EMPTY_PROMPT
    return tokenizer.encode(prompt)


def stream_characters(engine: Engine, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int, *,
                      num_samples: int = 1, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, seed: int | None = None) -> Iterator[list[str]]:
    """Yield, at each step, the next character of each of `num_samples` samples.

    Bad arguments raise here, before the first step is asked for.
    """
    sampler = Sampler(temperature, top_k, top_p, seed)
    ids = prompt_ids(tokenizer, prompt)
    check_lengths(max_new_tokens, num_samples)
    steps = generate_tokens(engine, ids, max_new_tokens, sampler, num_samples)
    return ([tokenizer.chars[i] for i in next_ids] for next_ids in steps)


def join_samples(prompt: str, steps: Iterator[list[str]], num_samples: int) -> list[str]:
    """Collect per-step characters into `num_samples` whole texts, each starting with the prompt."""
    columns = list(steps)
    return [prompt + "".join(sample) for sample in zip(*columns)] if columns else [prompt] * num_samples
