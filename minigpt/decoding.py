"""The decoding loop every engine shares, in numpy alone (no torch import).

An engine runs one kind of call, `extend`: write k token ids into rows of a
batch at positions the caller gives (gpt-fast's `input_pos`) and return the
logits of every new position; a prefill is an extend at position 0. A `Step`
finds the tokens after the rows' pending ones and `generate_rows` drives it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from minigpt.engine_checks import check_lengths
from minigpt.errors import MiniGPTError
from minigpt.rows import Rows
from minigpt.sampling import Sampler, rows_alike


class Engine(Protocol):
    """Buffers for a batch of rows and one forward pass over them; engines differ only in the logits."""

    block_size: int
    verifies_rows_together: bool  # whether one extend may write several tokens to each of several rows

    def start(self, batch_size: int) -> None: ...

    def extend(self, ids: np.ndarray, start_pos: np.ndarray, first_row: int = 0,
               last_only: bool = False) -> np.ndarray:
        """Write (n, k) ids into rows first_row .. first_row+n-1, row i at positions start_pos[i] onwards (a
        shorter start rolls a row back); return the (n, k, V) logits, valid until the next call (last_only:
        (n, 1, V), each row's last position's, all a prefill needs)."""

    def move_row(self, source: int, target: int, length: int) -> None:
        """Make row `target` hold the first `length` positions of row `source`."""


@dataclass(eq=False)
class Continuation:
    """One sequence being generated: its prompt, how it samples, its tokens so far (the last not yet cached)."""

    prompt: list[int]
    sampler: Sampler
    stream: np.random.Generator | None  # its own draws (None when greedy)
    max_new_tokens: int
    tokens: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.max_new_tokens

    def fail(self, error: Exception) -> None:  # a server ends this sequence's request alone
        raise error


def pick(logits: np.ndarray, sequences: Sequence[Continuation], draws: np.ndarray | None = None,
         ahead: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Each row's token from (rows, V) logits, row i as sequences[i] samples with draws[i] (by default its next
    draw), its text so far taken to go on with ahead[i] (a verify's guesses); rows alike are picked together."""
    first = sequences[0].sampler
    alike = len(sequences) == 1 or all(sequence.sampler is first for sequence in sequences)
    if first.reads_text if alike else any(sequence.sampler.reads_text for sequence in sequences):
        logits = logits.copy()  # the engine's logits stay the model's own (logprobs report them)
        for i, sequence in enumerate(sequences):
            if sequence.sampler.reads_text:  # penalties, a pattern: `minigpt.controls`
                sequence.sampler.adjust(logits[i], sequence, ahead[i] if ahead else ())
    if alike:
        if first.greedy:
            return logits.argmax(axis=-1)
        groups = [(slice(None), first)]
    else:
        groups = rows_alike([sequence.sampler for sequence in sequences])
    if draws is None:
        draws = np.array([0.0 if sequence.stream is None else sequence.stream.random() for sequence in sequences])
    ids = np.zeros(len(logits), dtype=np.int64)
    for rows, sampler in groups:
        try:
            ids[rows] = sampler.pick(logits[rows], draws[rows])
        except Exception as error:  # noqa: BLE001 - each sequence decides what a failure means for it
            for row in range(len(sequences))[rows] if isinstance(rows, slice) else rows:
                sequences[row].fail(error)
    return ids


class Step(Protocol):
    """One step of decoding: write each row's pending token, find the tokens after it."""

    def rows(self, engine: Engine, capacity: int) -> Rows: ...  # the rows this step writes to

    def __call__(self, rows: Rows, pending: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
        """Each row's new tokens (the last is its new pending token) and the (rows, width, V) logits that row
        i's j-th new token was picked from, at [i, j]."""


class PlainStep:
    """One extend, one pick: a token a row."""

    def rows(self, engine: Engine, capacity: int) -> Rows:
        return Rows(engine, capacity)

    def __call__(self, rows: Rows, pending: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
        logits = rows.decode(pending)
        return [[token] for token in pick(logits[:, 0], rows.sequences).tolist()], logits


def generate_rows(engine: Engine, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampler: Sampler,
                  step: Step | None = None, by_step: bool = False) -> Iterator[np.ndarray]:
    """Yield the (rows,) ids of each new position (by_step: a step's positions together, (rows, n)) for prompts
    of any lengths, one row each; any step (the speculative one finds several tokens at once) gives the same ids."""
    check_lengths(max_new_tokens, len(prompts))
    step = step or PlainStep()
    rows = step.rows(engine, len(prompts))  # first: a batch that cannot fit is refused before anything is made
    if any(np.ndim(prompt) != 1 for prompt in prompts):  # one prompt's ids alone would be a batch of numbers
        raise MiniGPTError("prompts is a list of prompts, each a list of token ids: give one prompt as [ids]")
    if any(len(prompt) == 0 for prompt in prompts):
        raise MiniGPTError("every prompt needs at least one token")
    found = _generate(rows, prompts, max_new_tokens, sampler, step)
    return found if by_step else (position for block in found for position in block.T)


def _generate(rows: Rows, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampler: Sampler,
              step: Step) -> Iterator[np.ndarray]:
    if max_new_tokens == 0:
        return
    sequences = [Continuation(list(prompt), sampler, stream, max_new_tokens)
                 for prompt, stream in zip(prompts, sampler.streams(len(prompts)))]
    pending = pick(rows.add(prompts, sequences), sequences)
    emitted = [[token] for token in pending.tolist()]
    given = 0  # positions handed out
    while True:
        for sequence, new in zip(rows.sequences, emitted):
            sequence.tokens += new
        ready = min(max_new_tokens, *(len(sequence.tokens) for sequence in sequences))  # found by every sequence
        if ready > given:  # handed out once, a step's positions together
            yield np.array([sequence.tokens[given:ready] for sequence in sequences])
        if (given := ready) == max_new_tokens:
            return
        if any(sequence.done for sequence in sequences):  # a row with all its tokens leaves: it would slow the rest
            pending = rows.remove([row for row, sequence in enumerate(rows.sequences) if sequence.done], pending)
        emitted, _ = step(rows, pending)
        pending = np.array([new[-1] for new in emitted])

