"""The decoding loop every engine shares, in numpy alone (no torch import).

An engine runs one kind of call, `extend`: write k token ids into rows of
a batch at positions the caller gives, and return the logits of every new
position. A prefill is an extend at position 0, a decode step an extend of
one token at each row's length. Rows are independent sequences, each at its
own length (a ragged batch): a row can be prefilled while the others keep
their caches, which is how sequences join a running batch. `Rows` is the one
place that keeps those lengths; the loop here (with its policy past the
block size) and the `Sampler` are the same for every engine, so engines can
only differ in the logits they compute, and they agree token for token.

Past the block size: learned positions stop at block_size, and a cache of
keys computed at positions 0..block_size-1 cannot slide (every key would
need its position changed). So when a row's context is full, that row alone
restarts from its most recent `block_size // 2` tokens: all but the newest
are prefilled into the row, and the newest joins the batch's next decode
step like any other row's. One prefill of half a block every half block,
instead of a full recompute every step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from minigpt.errors import MiniGPTError
from minigpt.sampling import Sampler
from minigpt.tokenizer import CharTokenizer

if TYPE_CHECKING:
    from minigpt.speculative import Speculator

EMPTY_PROMPT = "\n"  # what an empty prompt starts from: the start of a new line


class Engine(Protocol):
    """What the loop needs of an engine: buffers for a batch of rows, and one forward pass over them.

    An engine holds buffers, not bookkeeping: which sequence sits in which row
    and how long it is lives in `Rows`, and every call says where its tokens go
    (gpt-fast's `input_pos`). So a prefill is `extend` at position 0, a decode
    step is `extend` of one token at each row's length, verifying k drafted
    tokens is `extend` of k, and rolling a row back is calling the next
    `extend` at a shorter length (what lies past it is overwritten).
    """

    block_size: int

    def start(self, batch_size: int) -> None:
        """Make room for `batch_size` rows."""

    def extend(self, ids: np.ndarray, start_pos: np.ndarray, first_row: int = 0) -> np.ndarray:
        """Write (n, k) ids into rows first_row .. first_row+n-1, row i at positions start_pos[i] ..
        start_pos[i]+k-1 after the start_pos[i] positions it already holds; return the (n, k, V) logits of
        every new position (position j's predicts the token after it), valid until the next call."""

    def move_row(self, source: int, target: int, length: int) -> None:
        """Make row `target` hold the first `length` positions of row `source` (as `Rows.remove` needs)."""


def prefill(engine: Engine, ids: np.ndarray, first_row: int = 0) -> np.ndarray:
    """Start rows first_row .. first_row+n-1 afresh from (n, T) ids; return their (n, V) next-token logits."""
    return engine.extend(ids, np.zeros(len(ids), dtype=np.int64), first_row)[:, -1]


def generate_tokens(engine: Engine, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler,
                    num_samples: int = 1, speculator: Speculator | None = None) -> Iterator[np.ndarray]:
    """Yield the (num_samples,) ids chosen at each step, all samples decoded as one batch."""
    return generate_rows(engine, [prompt_ids] * num_samples, max_new_tokens, sampler, speculator)


def generate_rows(engine: Engine, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  sampler: Sampler, speculator: Speculator | None = None) -> Iterator[np.ndarray]:
    """Yield the (rows,) ids chosen at each step for a batch of prompts of any lengths (one row each). With a
    speculator the ids are the same, found several at a time (`minigpt.speculative`)."""
    check_lengths(max_new_tokens, len(prompts))
    if any(len(prompt) == 0 for prompt in prompts):
        raise MiniGPTError("every prompt needs at least one token")
    if speculator is not None and speculator.pays(engine, [sampler] * len(prompts)):
        return speculator.decode(Rows(engine, len(prompts)), prompts, max_new_tokens, sampler)
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

    The one place that knows which sequence is in which row (`payloads[row]`,
    whatever the driver keeps per sequence) and how long it is (`lengths`).
    Sequences join (`add`) and leave (`remove`) between steps; `decode`
    extends every one by a token. Continuous batching is this and nothing more:
    `minigpt generate` and the server's scheduler both drive it.
    """

    def __init__(self, engine: Engine, capacity: int):
        self.engine, self.capacity = engine, capacity
        self.block, self.keep = engine.block_size, max(1, engine.block_size // 2)
        self.count = 0
        self.payloads: list = []  # payloads[row]: the driver's object for the sequence in that row
        self.lengths = np.zeros(capacity, dtype=np.int64)  # tokens in each row's cache
        self.tokens = np.zeros((capacity, self.block), dtype=np.int64)  # and which they are
        self.room = self.block  # decode steps before some row is full: rows are looked at only then
        self._all_rows = np.arange(capacity)
        engine.start(capacity)

    def add(self, prompts: Sequence[Sequence[int]], payloads: Sequence | None = None) -> np.ndarray:
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
            logits.append(prefill(self.engine, self.tokens[rows, :lengths[start]], rows.start))
        self.lengths[first:first + len(prompts)] = lengths
        self.payloads += list(payloads) if payloads is not None else [None] * len(prompts)
        self.count += len(prompts)
        self.room = min(self.room, self.block - int(lengths.max()))
        return np.concatenate(logits)

    def remove(self, rows: Iterable[int], carry: np.ndarray | None = None) -> np.ndarray | None:
        """Free these rows; the last rows move into the gaps, so rows stay packed (any row index may change).

        `carry`, one entry per row (the ids about to be decoded, say), is
        moved the same way and returned cut to the rows that are left.
        """
        for row in sorted(rows, reverse=True):  # from the end: the last row is then never one being freed
            last = self.count - 1
            if row != last:
                self.engine.move_row(last, row, int(self.lengths[last]))
                self.lengths[row], self.tokens[row] = self.lengths[last], self.tokens[last]
                self.payloads[row] = self.payloads[last]
                if carry is not None:
                    carry[row] = carry[last]
            self.payloads.pop()
            self.count -= 1
        return None if carry is None else carry[:self.count]

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Append (count,) ids, one to each row; return the (count, V) next-token logits."""
        if self.room == 0:  # full rows restart (see the module's docstring)
            self._restart_full_rows()
        lengths = self.lengths[:self.count]
        logits = self.engine.extend(ids[:, None], lengths)
        self.tokens[self._all_rows[:self.count], lengths] = ids
        self.lengths[:self.count] = [length + 1 for length in lengths.tolist()]  # cheaper than += after a call
        self.room -= 1
        return logits[:, 0]

    def make_room(self) -> int:
        """Restart the rows that are full, if any; return how many positions every row can still take."""
        self.room = self.block - int(self.lengths[:self.count].max(initial=0))
        if self.room == 0:
            self._restart_full_rows()
        return self.room

    def extend(self, ids: np.ndarray) -> np.ndarray:
        """Append (count, k) ids to every row, k <= make_room(); return the (count, k, V) logits."""
        logits = self.engine.extend(ids, self.lengths[:self.count])
        new, starts = ids.shape[1], self.lengths[:self.count].tolist()
        for row, start in enumerate(starts):  # slices: cheaper than a fancy index
            self.tokens[row, start:start + new] = ids[row]
        self.lengths[:self.count] = [start + new for start in starts]
        self.room -= new
        return logits

    def roll_back(self, lengths: list[int]) -> None:
        """Keep only the first lengths[i] positions of each row i (the engine overwrites the rest when it next
        writes)."""
        self.lengths[:self.count] = lengths
        self.room = self.block - max(lengths, default=0)

    def _restart_full_rows(self) -> None:
        full = np.flatnonzero(self.lengths[:self.count] == self.block)
        # Neighbouring full rows (the samples of one prompt, say) restart in one prefill.
        for first, count in runs_of_equal(full - np.arange(len(full))):
            rows = slice(full[first], full[first] + count)
            kept = self.tokens[rows, self.block - self.keep + 1:].copy()  # the newest token comes with the decode
            if kept.shape[1]:
                prefill(self.engine, kept, rows.start)
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


def check_extend(ids: np.ndarray, start_pos: np.ndarray, first_row: int, batch_size: int,
                 block_size: int) -> int:
    """The checks every engine's `extend` makes (the rows exist, every new position fits the block; start
    positions are >= 0 by contract); returns the end of the longest row after the call. It runs every decode
    step, so it costs one reduction."""
    rows, length = ids.shape
    if not 0 <= first_row <= first_row + rows <= batch_size:
        raise MiniGPTError(f"rows {first_row}..{first_row + rows - 1} are outside the batch of {batch_size} "
                           "rows; call start() with a larger batch")
    if len(start_pos) != rows:
        raise MiniGPTError(f"{rows} rows of ids need {rows} start positions, got {len(start_pos)}")
    end = max(start_pos.tolist(), default=0) + length  # a few rows: a list's max beats a numpy reduction
    if end > block_size:
        raise MiniGPTError(f"positions up to {end} exceed block_size {block_size}; "
                           "keep the last block_size tokens")
    return end


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
                      top_p: float | None = None, seed: int | None = None,
                      speculator: Speculator | None = None) -> Iterator[list[str]]:
    """Yield, at each step, the next character of each of `num_samples` samples.

    Bad arguments raise here, before the first step is asked for.
    """
    sampler = Sampler(temperature, top_k, top_p, seed)
    ids = prompt_ids(tokenizer, prompt)
    check_lengths(max_new_tokens, num_samples)
    steps = generate_tokens(engine, ids, max_new_tokens, sampler, num_samples, speculator)
    return ([tokenizer.chars[i] for i in next_ids] for next_ids in steps)


def join_samples(prompt: str, steps: Iterator[list[str]], num_samples: int) -> list[str]:
    """Collect per-step characters into `num_samples` whole texts, each starting with the prompt."""
    columns = list(steps)
    return [prompt + "".join(sample) for sample in zip(*columns)] if columns else [prompt] * num_samples
