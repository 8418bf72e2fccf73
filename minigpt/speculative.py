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

DECIDE_EVERY = 4  # steps between choices of k
PROBE_EVERY = 8  # decisions for k = 0 (16 steps each) before guessing again, to notice a draft that helps now
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
        self.accepted, self.guessed = 0.5, 1.0  # a weak prior: one guess, half right
        self.step_seconds: dict[int, float] = {}  # measured time of a step at each k (moving average)
        self.warmed: set[int] = set()
        self.plain_steps = self.plain_decisions = 0  # steps run at k = 0, and decisions for it
        self.countdown, self.chosen = 0, 0

    @staticmethod
    def pays(engine, rows: int) -> bool:
        """Whether guessing can pay for `rows` rows on `engine`: not for a batch on an engine that verifies
        several tokens one row per call (onnxruntime), where a verify step costs a call per row."""
        return rows == 1 or getattr(engine, "verifies_rows_together", True)

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / max(1, self.steps)

    def report(self) -> str:
        if not self.steps:
            return f"off for this batch on this engine ({self.draft.name} draft)"
        return f"{self.tokens_per_step:.2f} tokens per step ({self.draft.name} draft, k <= {self.max_tokens})"

    def decode(self, rows: Rows, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               sampler: Sampler) -> Iterator[np.ndarray]:
        """Yield (rows,) ids step by step, as `minigpt.decoding.generate_rows` does without a draft."""
        if max_new_tokens == 0:
            return
        streams = sampler.streams(len(prompts))
        pending = sampler(rows.add(prompts), streams)  # each row's next token, not yet in its cache
        ready = [deque() for _ in prompts]  # tokens found ahead of the others, per row
        yield pending.copy()
        produced = 1
        while produced < max_new_tokens:
            started = time.perf_counter()
            k = self._choose_k()
            if k:
                k = min(k, rows.make_room() - 1)
            emitted = self._verify_step(rows, pending, k, sampler, streams, started) if k else None
            if emitted is None:  # a plain step, as lean as plain decoding's
                logits = rows.decode(pending)
                self._learn(0, None, [], time.perf_counter() - started)
                pending = sampler(logits, streams)
            else:
                pending = np.array([tokens[-1] for tokens in emitted], dtype=np.int64)
            if emitted is None and not any(ready):
                yield pending.copy()
                produced += 1
                continue
            for row, tokens in enumerate(emitted or [[token] for token in pending.tolist()]):
                ready[row].extend(tokens)
            while all(ready) and produced < max_new_tokens:  # every row has its next token: hand them out
                yield np.array([queue.popleft() for queue in ready], dtype=np.int64)
                produced += 1

    def _verify_step(self, rows: Rows, pending: np.ndarray, k: int, sampler: Sampler, streams: list,
                     started: float) -> list[list[int]]:
        """Write each row's next token and up to k guesses after it, verify them; return each row's emitted
        tokens (its new pending one last), or None when the draft had no guess (a plain step then)."""
        lengths = rows.lengths[:rows.count].tolist()
        for row, length in enumerate(lengths):  # where extend writes it: the drafts see it there
            rows.tokens[row, length] = pending[row]
        guesses = [self.draft.propose(rows.tokens[row, :length + 1], k) for row, length in enumerate(lengths)]
        k = max(map(len, guesses))
        if k == 0:  # nothing to verify: a miss for every row
            self.accepted, self.guessed = 0.95 * self.accepted, 0.95 * self.guessed + rows.count
            return None
        ids = np.zeros((rows.count, k + 1), dtype=np.int64)
        ids[:, 0] = pending
        for row, guess in enumerate(guesses):
            ids[row, 1:len(guess) + 1] = guess  # a short guess is padded: a padded guess is verified like any
        logits = rows.extend(ids)
        # Timed to here: what guessing costs. Picking tokens costs the same per token as in plain decoding.
        seconds = time.perf_counter() - started
        accepted, emitted = verify(logits, ids[:, 1:], sampler, streams)
        for row, kept in enumerate(accepted):
            rows.roll_back(row, lengths[row] + 1 + kept)
        self._learn(k, accepted, [len(guess) for guess in guesses], seconds)
        return emitted

    def _choose_k(self) -> int:
        """The k with the most expected tokens per second, from the acceptance rate and measured step times;
        decided again every DECIDE_EVERY steps (deciding costs more than a plain step's bookkeeping)."""
        if 0 not in self.step_seconds:  # time plain steps first: the yardstick every k is weighed against
            return 0
        self.countdown -= 1
        if self.countdown > 0:
            return self.chosen
        self.chosen = self._best_k()
        self.countdown = DECIDE_EVERY if self.chosen else 4 * DECIDE_EVERY  # plain stays plain a while
        return self.chosen

    def _best_k(self) -> int:
        rate = min(self.accepted / self.guessed, 0.99)
        base = self.step_seconds[0]
        guessing = [k for k in self.step_seconds if k > 0]
        # What one more guess costs: from the largest k timed (onnxruntime verifies a batch row by row, so for
        # batches this is steep), else a prior.
        slope = (max(0.0, (self.step_seconds[max(guessing)] - base) / max(guessing)) if guessing
                 else UNMEASURED_COST_PER_TOKEN * base)

        def cost(k: int) -> float:
            return self.step_seconds.get(k, base + slope * k)

        best = max(range(self.max_tokens + 1), key=lambda k: (1 - rate ** (k + 1)) / (1 - rate) / cost(k))
        if best == 0:
            self.plain_decisions += 1
            if self.plain_decisions % PROBE_EVERY == 0:  # now and then, a few steps see whether guessing pays
                return 1
        return best

    def _learn(self, k: int, accepted: list[int] | None, guessed: list[int], seconds: float) -> None:
        self.steps += 1
        self.plain_steps += k == 0
        self.tokens += 1 + (sum(accepted) / len(accepted) if accepted else 0)
        if k:
            # Guesses a row did not reach (after a wrong one) say nothing about the draft: count up to the first miss.
            reached = sum(min(g, a + 1) for g, a in zip(guessed, accepted))
            self.accepted = 0.95 * self.accepted + sum(accepted)
            self.guessed = 0.95 * self.guessed + max(1, reached)
        if k not in self.warmed:  # a shape's first call builds its binding: not what later steps cost
            self.warmed.add(k)
            return
        previous = self.step_seconds.get(k)
        self.step_seconds[k] = seconds if previous is None else 0.9 * previous + 0.1 * seconds


def verify(logits: np.ndarray, drafts: np.ndarray, sampler: Sampler,
           streams: list) -> tuple[list[int], list[list[int]]]:
    """For (rows, k + 1, V) logits and (rows, k) guesses: how many guesses each row accepts, and the tokens it
    emits (its picks: the accepted guesses, then the model's own). One draw per pick, as plain decoding."""
    rows, k = drafts.shape
    if sampler.greedy:  # no draws: every position's pick at once
        picks, guesses = np.argmax(logits, axis=-1).tolist(), drafts.tolist()
        accepted = []
        for row_picks, row_guesses in zip(picks, guesses):
            kept = 0
            while kept < k and row_picks[kept] == row_guesses[kept]:
                kept += 1
            accepted.append(kept)
        return accepted, [row_picks[:kept + 1] for row_picks, kept in zip(picks, accepted)]
    accepted, emitted = [0] * rows, [[] for _ in range(rows)]
    active = list(range(rows))
    for position in range(k + 1):
        picks = sampler(logits[active, position], [streams[row] for row in active]).tolist()
        still = []
        for row, pick in zip(active, picks):
            emitted[row].append(pick)
            if position < k and pick == drafts[row, position]:
                accepted[row] += 1
                still.append(row)
        active = still
        if not active:
            break
    return accepted, emitted
