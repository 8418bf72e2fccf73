"""A smaller model as the draft (gpt-fast's draft model): its own engine, its own cache of each row.

numpy only, as `minigpt.drafts`: the draft's engine may be onnxruntime's.
"""

from __future__ import annotations

import numpy as np

from minigpt.rows import restart_length
from minigpt.sampling import rows_alike


class ModelDraft:
    """A smaller model's guesses (gpt-fast's draft model), through any engine: it must share the model's
    vocabulary. Greedy rows get its argmax; sampling rows what their sampler picks from its logits with the
    row's own next draws, which is the model's own pick wherever the two models agree. Each row keeps its own
    cache of what the draft has read, so a step only feeds it the tokens that are new since the last (the
    accepted guesses and the model's own token)."""

    name = "model"

    def __init__(self, engine):
        self.engine, self.block = engine, engine.block_size
        self.keep = restart_length(self.block)
        self.read: list[np.ndarray] = []  # per row: the tokens in the draft's cache
        self.offsets: list[int] = []  # per row: where in the row's history the draft's window starts

    @staticmethod
    def stops_itself(sampler) -> bool:
        return False

    def propose_rows(self, histories: list[np.ndarray], limits: list[int], draws: np.ndarray | None = None,
                     samplers: list | None = None) -> list[list[int]]:
        """The same number of guesses for each row of the batch (the most of `limits`), the draft's rows decoded
        together."""
        k = min(max(limits), self.keep)
        if len(histories) != len(self.read):
            self.engine.start(len(histories))
            self.read, self.offsets = [np.zeros(0, dtype=np.int64)] * len(histories), [0] * len(histories)
        logits = np.stack([self._catch_up(row, np.asarray(history), k) for row, history in enumerate(histories)])
        lengths = np.array([len(read) for read in self.read])
        guesses = []
        sampling = [(rows, sampler) for rows, sampler in (rows_alike(samplers) if draws is not None else ())
                    if not sampler.greedy]
        for step in range(k):
            next_ids = np.argmax(logits, axis=-1)
            for rows, sampler in sampling:
                next_ids[rows] = sampler.pick(logits[rows], draws[rows, step])
            guesses.append(next_ids)
            if step + 1 < k:
                logits = self.engine.extend(next_ids[:, None], lengths + step)[:, 0]
        guessed = np.stack(guesses, axis=1)
        self.read = [np.concatenate([read, row_guesses[:-1]]) for read, row_guesses in zip(self.read, guessed)]
        return guessed.tolist()

    def _catch_up(self, row: int, history: np.ndarray, k: int) -> np.ndarray:
        """Feed row's cache what its history has that the cache lacks; return the next-token logits. Past the
        draft's block the window restarts from its newest tokens (as `minigpt.rows` restarts a row)."""
        offset = self.offsets[row]
        if offset >= len(history) or len(history) - offset + k - 1 > self.block:
            offset = max(0, len(history) - self.keep)
        window, read = history[offset:], self.read[row] if offset == self.offsets[row] else history[:0]
        same = min(len(read), len(window) - 1)
        differs = np.flatnonzero(read[:same] != window[:same])
        same = int(differs[0]) if len(differs) else same
        logits = self.engine.extend(window[None, same:], np.array([same]), first_row=row, last_only=True)[0, -1]
        self.read[row], self.offsets[row] = window, offset
        return logits
