"""Speculative decoding that changes nothing but the speed.

Plain decoding pays one engine call per character. Here each step a draft
(`minigpt.drafts`) guesses up to k characters after each row's next token,
and one `extend` writes that token and the guesses and returns the model's
logits at every one of those positions. Then, position by position, each
row picks its next token exactly as plain decoding would, from the model's
logits with the row's next random draw (argmax when greedy), and keeps going
while the pick equals the guess. A row emits every pick it made: the
guesses that were right, then the model's own pick where a guess was wrong
(or after the last guess). Every emitted token is a pick from the same
logits (the same context) with the same draw as in plain decoding, so greedy
and sampled text are identical to plain decoding for the same seed, at any
temperature, top-k and top-p; the cache positions of wrong guesses are
rolled back by lowering the row's length.

How many guesses pay depends on the draft and the engine: k is chosen each
step to maximise expected tokens per second, from the measured acceptance
rate and the measured time of a step at each k (k = 0 is plain decoding,
which a poor draft falls back to).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np

from minigpt.decoding import Rows
from minigpt.sampling import Sampler

PROBE_EVERY = 32  # steps at k = 0 before guessing again, to notice a draft that became useful
UNMEASURED_COST_PER_TOKEN = 0.2  # a step's cost per extra token until measured (onnxruntime: ~0.15-0.2)


def make_speculator(choice: str, ngram, max_tokens: int = 8) -> "Speculator | None":
    """The speculator for --draft: "none", "ngram" (the model's table), "context", or "auto" (the table when
    there is one, else context)."""
    from minigpt.drafts import ContextDraft
    from minigpt.errors import MiniGPTError

    if choice == "none":
        return None
    if choice == "ngram" and ngram is None:
        raise MiniGPTError("this model carries no n-gram draft table (it was trained before minigpt stored one); "
                           "use --draft context, or train it again")
    draft = ngram if choice in ("ngram", "auto") and ngram is not None else ContextDraft()
    return Speculator(draft, max_tokens)


class Speculator:
    """Speculative decoding with one draft, up to `max_tokens` guesses a step; counts what it did."""

    def __init__(self, draft, max_tokens: int = 4):
        self.draft, self.max_tokens = draft, max_tokens
        self.steps, self.tokens = 0, 0.0  # verify steps, and tokens a row emitted in them, for the report
        self.accepted, self.guessed = 1.0, 2.0  # a prior of one accepted guess in two
        self.step_seconds: dict[int, float] = {}  # measured time of a step at each k (moving average)
        self.plain_steps = 0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / max(1, self.steps)

    def report(self) -> str:
        return f"{self.tokens_per_step:.2f} tokens per step ({self.draft.name} draft, k <= {self.max_tokens})"

    def decode(self, rows: Rows, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               sampler: Sampler) -> Iterator[np.ndarray]:
        """Yield (rows,) ids step by step, as `minigpt.decoding.generate_rows` does without a draft."""
        if max_new_tokens == 0:
            return
        streams = sampler.streams(len(prompts))
        pending = sampler(rows.add(prompts), streams)  # each row's next token, not yet in its cache
        ready = [deque([token]) for token in pending]
        produced = 0
        while True:
            while all(ready) and produced < max_new_tokens:  # every row has its next token: hand them out
                yield np.array([queue.popleft() for queue in ready], dtype=np.int64)
                produced += 1
            if produced == max_new_tokens:
                return
            for row, emitted in enumerate(self._step(rows, pending, sampler, streams)):
                ready[row].extend(emitted)
                pending[row] = emitted[-1]

    def _step(self, rows: Rows, pending: np.ndarray, sampler: Sampler, streams: list) -> list[list[int]]:
        """One verify step over every row; returns each row's emitted tokens (its new pending one last)."""
        started = time.perf_counter()
        k = min(self._choose_k(), rows.make_room() - 1)
        guesses = [self.draft.propose(rows.history(row).tolist() + [int(pending[row])], k) if k > 0 else []
                   for row in range(rows.count)]
        k = max(map(len, guesses), default=0)
        drafts = np.zeros((rows.count, k), dtype=np.int64)
        for row, guess in enumerate(guesses):
            drafts[row, :len(guess)] = guess  # a short guess is padded: a padded guess is verified like any
        lengths = rows.lengths[:rows.count].copy()
        logits = rows.extend(np.concatenate([pending[:, None], drafts], axis=1))
        accepted, picks = verify(logits, drafts, sampler, streams)
        emitted = []
        for row in range(rows.count):
            rows.roll_back(row, int(lengths[row]) + 1 + int(accepted[row]))
            emitted.append(picks[row])
        self._learn(k, accepted, [len(guess) for guess in guesses], time.perf_counter() - started)
        return emitted

    def _choose_k(self) -> int:
        """The k with the most expected tokens per second, from the acceptance rate and measured step times."""
        rate = min(self.accepted / self.guessed, 0.99)
        measured = min(self.step_seconds.items(), default=(0, 1.0))  # the smallest k timed so far
        base = measured[1] / (1 + UNMEASURED_COST_PER_TOKEN * measured[0])  # what k = 0 would cost, by the model

        def cost(k: int) -> float:
            return self.step_seconds.get(k, base * (1 + UNMEASURED_COST_PER_TOKEN * k))

        best = max(range(self.max_tokens + 1), key=lambda k: (1 - rate ** (k + 1)) / (1 - rate) / cost(k))
        if best == 0:
            self.plain_steps += 1
            if self.plain_steps % PROBE_EVERY == 0:
                return min(1, self.max_tokens)
        return best

    def _learn(self, k: int, accepted: np.ndarray, guessed: list[int], seconds: float) -> None:
        self.steps += 1
        self.tokens += float(accepted.mean()) + 1
        if k:
            # Guesses a row did not reach (after a wrong one) say nothing about the draft: count up to the first miss.
            reached = np.minimum(np.array(guessed), accepted + 1)
            self.accepted = 0.95 * self.accepted + int(accepted.sum())
            self.guessed = 0.95 * self.guessed + max(1, int(reached.sum()))
        previous = self.step_seconds.get(k)
        self.step_seconds[k] = seconds if previous is None else 0.9 * previous + 0.1 * seconds


def verify(logits: np.ndarray, drafts: np.ndarray, sampler: Sampler,
           streams: list) -> tuple[np.ndarray, list[list[int]]]:
    """For (rows, k + 1, V) logits and (rows, k) guesses: how many guesses each row accepts, and the tokens it
    emits (its picks: the accepted guesses, then the model's own). One draw per pick, as plain decoding."""
    rows, k = drafts.shape
    if sampler.greedy:  # no draws: every position's pick at once
        picks = np.argmax(logits, axis=-1)
        accepted = np.cumprod(picks[:, :k] == drafts, axis=1).sum(axis=1) if k else np.zeros(rows, dtype=np.int64)
        return accepted, [picks[row, :accepted[row] + 1].tolist() for row in range(rows)]
    accepted, emitted = np.zeros(rows, dtype=np.int64), [[] for _ in range(rows)]
    active = np.arange(rows)
    for position in range(k + 1):
        picks = sampler(logits[active, position], [streams[row] for row in active])
        for row, pick in zip(active, picks):
            emitted[row].append(int(pick))
        if position == k:
            break
        hit = picks == drafts[active, position]
        accepted[active[hit]] += 1
        active = active[hit]
        if not len(active):
            break
    return accepted, emitted
