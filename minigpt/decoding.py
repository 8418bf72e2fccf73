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
        valid until the next call."""


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
    rows, block, keep = len(prompts), engine.block_size, max(1, engine.block_size // 2)
    prompts = [np.asarray(prompt, dtype=np.int64) for prompt in prompts]
    lengths = np.array([len(prompt) for prompt in prompts])
    context = np.minimum(lengths, block)  # a long prompt is read through its last block_size tokens
    engine.start(rows)

    def window(first: int, count: int) -> np.ndarray:
        return np.stack([prompt[-context[first]:] for prompt in prompts[first:first + count]])

    # Rows of one length prefill together (all of them, when the prompts are alike).
    logits = np.concatenate([engine.prefill(window(first, count), first) for first, count in runs_of_equal(lengths)])
    generated = np.empty((rows, max_new_tokens), dtype=np.int64)
    # The step at which each row's context is full; the loop looks at rows only on such steps.
    full_at = block - context
    next_full = int(full_at.min())
    for step in range(max_new_tokens):
        next_ids = sampler(logits)
        generated[:, step] = next_ids
        yield next_ids
        if step + 1 == max_new_tokens:
            break
        if step == next_full:  # full rows restart (see the module's docstring)
            for row in np.flatnonzero(full_at == step):
                history = np.concatenate((prompts[row][-keep:], generated[row, :step + 1]))
                engine.prefill(history[None, -keep:-1], row)  # the newest token comes with the decode
                full_at[row] = step + 1 + block - keep
            next_full = int(full_at.min())
        logits = engine.decode(next_ids)


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
