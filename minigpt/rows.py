"""The sequences in an engine's batch, one per row: which sits where, and how many tokens its cache holds.

Sequences join (`add`) and leave (`remove`) between steps, and each step
writes one token to every row (`decode`): continuous batching is no more.
Past the block size a cache cannot slide (each key was computed at its
position), so a full row restarts from its newest half block: one prefill
every half block instead of a recompute every step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from minigpt.errors import MiniGPTError


def restart_length(block_size: int) -> int:
    """How many of its newest tokens a full row keeps when it restarts (every cache that restarts uses it)."""
    return max(1, block_size // 2)


def prefill(engine, ids: np.ndarray, first_row: int = 0) -> np.ndarray:
    """Start rows first_row .. first_row+n-1 afresh from (n, T) ids; return their (n, V) next-token logits."""
    return engine.extend(ids, np.zeros(len(ids), dtype=np.int64), first_row, last_only=True)[:, -1]


class Rows:
    """The rows of an engine's batch (an `Engine` of `minigpt.decoding`), packed into rows 0 .. count-1."""

    def __init__(self, engine, capacity: int):
        self.engine, self.capacity = engine, capacity
        self._block = engine.block_size
        self._sequences: list = []  # the driver's record of the sequence in each row
        self._lengths = np.zeros(capacity, dtype=np.int64)  # tokens in each row's cache
        self._tokens = np.zeros((capacity, self._block), dtype=np.int64)  # and which they are
        # At least the longest row's length, as a plain int: a decode step then checks for a full row without
        # a numpy call (numpy calls between two graph calls run on a cold cache).
        self._longest = 0
        engine.start(capacity)

    @property
    def count(self) -> int:
        return len(self._sequences)

    @property
    def sequences(self) -> tuple:
        return tuple(self._sequences)

    def lengths(self) -> list[int]:
        return self._lengths[:self.count].tolist()

    def room(self) -> int:
        """How many more positions every row can take before one is full."""
        return self._block - max(self.lengths(), default=0)

    def add(self, prompts: Sequence[Sequence[int]], sequences: Sequence | None = None) -> np.ndarray:
        """Prefill prompts (each through its last block) into the next free rows; return their (n, V) logits."""
        if self.count + len(prompts) > self.capacity:
            raise MiniGPTError(f"{self.count} rows are in use; {len(prompts)} more exceed the capacity of "
                               f"{self.capacity}")
        first = self.count
        windows = [np.asarray(prompt, dtype=np.int64)[-self._block:] for prompt in prompts]
        lengths = np.array([len(window) for window in windows])
        logits = []
        for start, count in runs_of_equal(lengths):  # rows of one length prefill together
            rows = slice(first + start, first + start + count)
            self._tokens[rows, :lengths[start]] = np.stack(windows[start:start + count])
            logits.append(prefill(self.engine, self._tokens[rows, :lengths[start]], rows.start))
        self._lengths[first:first + len(prompts)] = lengths
        self._longest = max(self._longest, *lengths.tolist())
        self._sequences += list(sequences) if sequences is not None else [None] * len(prompts)
        return np.concatenate(logits)

    def remove(self, rows: Iterable[int], carry: np.ndarray | None = None) -> np.ndarray | None:
        """Free these rows, moving the last rows into the gaps; `carry` (an entry a row) moves alike, cut."""
        for row in sorted(rows, reverse=True):  # from the end: the last row is then never one being freed
            last = self.count - 1
            if row != last:
                self.engine.move_row(last, row, int(self._lengths[last]))
                self._lengths[row], self._tokens[row] = self._lengths[last], self._tokens[last]
                self._sequences[row] = self._sequences[last]
                if carry is not None:
                    carry[row] = carry[last]
            self._sequences.pop()
        return None if carry is None else carry[:self.count]

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Append (count,) ids, one to each row (full rows restart first); return the (count, 1, V) logits."""
        if self._longest >= self._block:
            self.make_room()
        logits = self.engine.extend(ids[:, None], self._lengths[:self.count])
        # Element by element: numpy's array calls, right after a graph call, run on a cold cache.
        starts = self._lengths[:self.count].tolist()
        for row, (start, token) in enumerate(zip(starts, ids.tolist())):
            self._tokens[row, start] = token
        self._lengths[:self.count] = [start + 1 for start in starts]
        self._longest += 1
        return logits

    def make_room(self) -> int:
        """Restart the rows that are full (see the module's docstring); return room()."""
        full = np.flatnonzero(self._lengths[:self.count] == self._block)
        keep = restart_length(self._block)
        # Neighbouring full rows (the samples of one prompt, say) restart in one prefill.
        for first, count in runs_of_equal(full - np.arange(len(full))):
            rows = slice(full[first], full[first] + count)
            kept = self._tokens[rows, self._block - keep + 1:].copy()  # the newest token comes with the step
            if kept.shape[1]:
                prefill(self.engine, kept, rows.start)
            self._tokens[rows, :kept.shape[1]] = kept
            self._lengths[rows] = kept.shape[1]
        self._longest = self._block - self.room()
        return self.room()


def runs_of_equal(values: np.ndarray) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of equal neighbouring values."""
    first = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[first]:
            yield first, i - first
            first = i
