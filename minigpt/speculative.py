"""Speculative decoding that changes nothing but the speed: a `Step` that finds several tokens a call.

Plain decoding pays one engine call per token. Here a draft (`minigpt.drafts`)
guesses up to k tokens after each row's pending one, and one `extend` writes
that token and the guesses and returns the model's logits at every one of
those positions. Then, position by position, each row picks its next token
exactly as plain decoding would, from the model's logits with the row's next
random draw (argmax when greedy), and keeps going while the pick equals the
guess. A row emits every pick it made: the guesses that were right, then the
model's own pick where a guess was wrong (or after the last guess). Every
emitted token is a pick from the same logits with the same draw as in plain
decoding, so the text is plain decoding's for the same seed, at any sampling
setting; the cache positions of wrong guesses are rolled back.

How far to guess is the draft's call and the measured speed's (`Schedule`):
a draft that knows how sure it is (the n-gram table's greedy guesses) stops
once it is unsure and, for a row alone, may go on to the most a step
verifies; other guesses stop at k, which grows after a step whose every
guess was kept and shrinks after a miss (as HuggingFace's assisted
generation schedules it). While verify steps emit tokens more slowly than
plain steps (a poor draft, random weights), decoding runs plain steps and
guesses again now and then. In a batch, where every row pays for the widest
guess, only guesses that stop themselves are made, up to k.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Protocol

import numpy as np

from minigpt.settings import DRAFT_TOKENS
from minigpt.decoding import Continuation, PlainStep, pick
from minigpt.draft_model import ModelDraft
from minigpt.drafts import ContextDraft
from minigpt.errors import MiniGPTError
from minigpt.rows import Rows
from minigpt.sampling import Sampler

# The schedule's constants; what each setting measured is in bench/README.md ("Speculative decoding").
DECIDE_EVERY = 4  # verify steps between comparisons with plain decoding
FIRST_GUESSES = 6  # where k starts for guesses no draft vouches for
PROBE_STEPS = 2  # verify steps a probe takes before it is judged (k = 1, then 3)
PLAIN_STRETCH = 16  # plain steps in a row when guessing does not pay
FIRST_PROBE = 1  # plain stretches before guessing again; doubled after each probe that did not pay
TIMED_PLAIN_STEPS = 2  # of each stretch: enough to keep the yardstick current
RECENT_STEPS = 8  # guessing and plain steps are judged on this many recent steps of each

DRAFT_CHOICES = ("auto", "ngram", "context", "none")  # or a smaller model's file


class Draft(Protocol):
    """Cheap guesses at the next tokens of each row, which the model then checks."""

    name: str

    def stops_itself(self, sampler: Sampler) -> bool:
        """Whether a row sampling with `sampler` gets guesses that stop where they become unlikely all to be
        right (such a row alone may take up to the most a step verifies, not the schedule's k)."""

    def propose_rows(self, histories: list[np.ndarray], limits: list[int], draws: np.ndarray | None,
                     samplers: list[Sampler]) -> list[list[int]]:
        """Up to limits[i] guesses after histories[i], row i sampling with samplers[i] and the draws[i] it will
        use there (draws None when every row is greedy)."""


def make_step(choice: str, ngram, max_tokens: int = DRAFT_TOKENS, draft_engine=None) -> SpeculativeStep | None:
    """The step --draft asks for: "none" (None: plain decoding), "ngram" (the model's table), "context",
    "auto" (the table when there is one, else context), or a draft model's file, whose engine is given."""
    if choice == "none":
        return None
    if draft_engine is not None:
        return SpeculativeStep(ModelDraft(draft_engine), max_tokens)
    if choice == "ngram" and ngram is None:
        raise MiniGPTError("this model carries no n-gram draft table (it was trained before minigpt stored one); "
                           "use --draft context, or train it again")
    draft = ngram if choice in ("ngram", "auto") and ngram is not None else ContextDraft()
    return SpeculativeStep(draft, max_tokens)


class VerifiedRows(Rows):
    """Rows that take each row's pending token and a draft's guesses in one call (`extend`), then keep the
    positions that were right (`keep`)."""

    def histories(self, pending: np.ndarray) -> list[np.ndarray]:
        """Each row's tokens, then pending[row] (the one it writes next): views, valid until the next write."""
        lengths = self.lengths()
        for row, (length, token) in enumerate(zip(lengths, pending.tolist())):
            self._tokens[row, length] = token
        return [self._tokens[row, :length + 1] for row, length in enumerate(lengths)]

    def extend(self, ids: np.ndarray) -> np.ndarray:
        """Write (count, k) ids after every row's tokens, k <= room(); return the (count, k, V) logits. Until
        `keep` says how many of them stay, the rows keep their lengths."""
        lengths, width = self._lengths[:self.count], ids.shape[1]
        logits = self.engine.extend(ids, lengths)
        for row, start in enumerate(lengths.tolist()):  # a slice a row: cheaper than one fancy-indexed write
            self._tokens[row, start:start + width] = ids[row]
        return logits

    def keep(self, lengths: list[int]) -> None:
        """Row i keeps its first lengths[i] positions (the engine overwrites the rest later)."""
        self._lengths[:self.count] = lengths
        self._longest = max(lengths, default=0)


class SpeculativeStep:
    """A `Step` that verifies a draft's guesses, up to `max_tokens` a step; counts what it did."""

    def __init__(self, draft: Draft, max_tokens: int = DRAFT_TOKENS):
        self.draft, self.max_tokens = draft, max_tokens
        self.plain = PlainStep()
        # By batch size (powers of two) and whether a row samples: step costs differ with both. Kept from call
        # to call, as a server keeps its step: what they measured holds for the engine, not for one prompt.
        self.schedules: dict[tuple[int, bool], Schedule] = {}
        self.steps, self.tokens, self.plain_steps = 0, 0.0, 0  # verify steps, tokens a row emitted in them

    def warm_up_step(self) -> SpeculativeStep:
        """A step for a warm-up run: this one's draft and schedules (what it measures of step costs serves the
        run after it), counts of its own (they stay out of that run's report)."""
        step = type(self)(self.draft, self.max_tokens)
        step.schedules = self.schedules
        return step

    def rows(self, engine, capacity: int) -> VerifiedRows:
        return VerifiedRows(engine, capacity)

    def __call__(self, rows: VerifiedRows, pending: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
        if not self.pays(rows):
            return self.plain(rows, pending)
        kind = rows.count.bit_length(), any(sequence.stream is not None for sequence in rows.sequences)
        schedule = self.schedules.get(kind)
        if schedule is None:  # made once a kind, not (as setdefault's argument would be) every step
            schedule = self.schedules[kind] = Schedule(self.max_tokens)
        if not schedule.plain_left:
            k, plain = schedule.choose_k()
            found = self._verify(rows, pending, k, schedule) if k else None
            if found is not None:
                return found
            schedule.plain_left, schedule.timed_left = plain, TIMED_PLAIN_STEPS
        schedule.plain_left -= 1
        self.plain_steps += 1
        if not schedule.timed_left:
            return self.plain(rows, pending)
        schedule.timed_left -= 1
        started = time.perf_counter()
        found = self.plain(rows, pending)
        schedule.record(0, time.perf_counter() - started)  # the yardstick guessing is weighed against
        return found

    def pays(self, rows: VerifiedRows) -> bool:
        """Whether guessing can pay: for a row alone; in a batch, whose rows all pay for the widest guess, only
        for guesses that stop themselves, on an engine that verifies a batch in one call."""
        if rows.count == 1:
            return True
        return rows.engine.verifies_rows_together and any(self.draft.stops_itself(sequence.sampler)
                                                          for sequence in rows.sequences)

    def _verify(self, rows: VerifiedRows, pending: np.ndarray, k: int,
                schedule: Schedule) -> tuple[list[list[int]], np.ndarray] | None:
        """Write each row's pending token and its guesses in one extend and keep the right ones; None when there
        is nothing to guess (or no room for it): a plain step then."""
        started = time.perf_counter()
        sequences = rows.sequences
        samplers = [sequence.sampler for sequence in sequences]
        stops = [self.draft.stops_itself(sampler) for sampler in samplers]
        alone = len(sequences) == 1
        reach = self.max_tokens if alone and stops[0] else k
        room = rows.room()
        if room <= reach:  # too close to the end of the block: a full row restarts first
            reach = min(reach, (room or rows.make_room()) - 1)
            if reach < 1:  # a row is one token from the end: its next token restarts it, in a plain step
                return None
        histories = rows.histories(pending)
        draws = read_draws(sequences, reach + 1)
        limits = [reach] if alone else [reach if stop else 0 for stop in stops]
        guesses = self.draft.propose_rows(histories, limits, draws, samplers)
        width = max(map(len, guesses))
        if width == 0:  # nothing to verify: as good as a plain step, which is what guessing is judged against
            give_back_draws(sequences, draws)
            schedule.verified.append((1, 0))
            return None
        logits = rows.extend(np.array([[first, *guess] + [0] * (width - len(guess))  # padding is not verified
                                       for first, guess in zip(pending.tolist(), guesses)], dtype=np.int64))
        accepted, emitted = verify(logits, guesses, sequences, draws)
        rows.keep([len(history) + kept for history, kept in zip(histories, accepted)])
        self.steps += 1
        self.tokens += 1 + sum(accepted) / len(accepted)
        schedule.settle(guesses, accepted, time.perf_counter() - started)  # timed with its picks, as plain steps
        return emitted, logits

    def report(self) -> str:
        if not self.steps + self.plain_steps:
            return (f"off for this batch (in a batch only greedy rows guess, on an engine that verifies a batch in "
                    f"one call; {self.draft.name} draft)")
        verified = f"{self.tokens / self.steps:.2f} a verify step, " if self.steps else ""
        per_step = (self.tokens + self.plain_steps) / (self.steps + self.plain_steps)
        return (f"{per_step:.2f} tokens per step ({verified}{self.plain_steps} plain steps; "
                f"{self.draft.name} draft, k <= {self.max_tokens})")


def verify(logits: np.ndarray, guesses: list[list[int]], sequences: list[Continuation],
           draws: np.ndarray | None) -> tuple[list[int], list[list[int]]]:
    """For (rows, k + 1, V) logits and each row's guesses (up to k): how many guesses each row accepts, and the
    tokens it emits (the accepted guesses, then the model's own pick). Every position is picked with the draw
    plain decoding would use there; the draws of positions past a row's own pick go back to its stream."""
    rows, positions = logits.shape[:2]
    reads_text = any(sequence.sampler.reads_text for sequence in sequences)
    if draws is None and not reads_text:  # every row greedy on the model's own logits (pick's commonest case)
        picks = logits.argmax(axis=-1).tolist()
    else:
        flat = [sequence for sequence in sequences for _ in range(positions)]
        flat_draws = None if draws is None else draws[:, :positions].reshape(-1)  # None: every row is greedy
        # Position j of a row is picked as if its first j guesses were already its text (penalties, a pattern).
        ahead = [guess[:j] for guess in guesses for j in range(positions)] if reads_text else None
        picks = pick(logits.reshape(rows * positions, -1), flat, flat_draws, ahead).reshape(rows, positions).tolist()
    accepted = [agreeing(row_guesses, row_picks) for row_guesses, row_picks in zip(guesses, picks)]
    if draws is not None:
        for sequence, kept in zip(sequences, accepted):
            if sequence.stream is not None:
                give_back(sequence.stream, draws.shape[1] - kept - 1)
    return accepted, [row_picks[:kept + 1] for row_picks, kept in zip(picks, accepted)]


def agreeing(guesses: list[int], picks: list[int]) -> int:
    """How many of the first guesses equal the picks at their positions: the guesses a row keeps."""
    kept = 0
    for guess, picked in zip(guesses, picks):
        if guess != picked:
            break
        kept += 1
    return kept


class Schedule:
    """How many guesses to verify next, from what recent steps achieved (see the module's docstring)."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.k = min(max_tokens, FIRST_GUESSES)  # the most guesses a row the draft does not vouch for takes next
        # A step's cost by its width (0: a plain step): the least of its recent times, since noise only adds.
        self.step_seconds: dict[int, float] = {}
        self._recent: dict[int, deque] = {}
        self.verified: deque = deque(maxlen=RECENT_STEPS)  # recent verify steps: (tokens a row emitted, width)
        self.countdown, self.stretches, self.probe_after = 0, 0, FIRST_PROBE
        self.judge_after = DECIDE_EVERY  # verify steps timed before guessing is judged (a probe's: fewer)
        self.plain_left = self.timed_left = 0  # plain steps left in this stretch, and how many of them to time

    def settle(self, guesses: list[list[int]], accepted: list[int], seconds: float) -> None:
        """Count what a verify step achieved in `seconds`; k grows by two after a step whose every guess was
        kept (the draft may be able to say more) and shrinks by one after a miss."""
        width = max(map(len, guesses))
        self.record(width, seconds)
        self.verified.append((1 + sum(accepted) / len(accepted), width))
        every_guess_kept = all(kept == len(guess) for guess, kept in zip(guesses, accepted))
        self.k = min(self.max_tokens, self.k + 2) if every_guess_kept else max(1, self.k - 1)

    def record(self, width: int, seconds: float) -> None:
        """What a step verifying `width` guesses took (0: a plain step)."""
        recent = self._recent.get(width)
        if recent is None:  # made once a width, not (as setdefault's argument would be) every step
            recent = self._recent[width] = deque(maxlen=RECENT_STEPS)
        recent.append(seconds)
        self.step_seconds[width] = min(recent)

    def choose_k(self) -> tuple[int, int]:
        """(k, plain steps to run if k is 0 or the draft has nothing to guess): guess while verify steps emit
        tokens faster than plain steps, judged again every DECIDE_EVERY verify steps; else a stretch of
        PLAIN_STRETCH plain steps, with a probe now and then to see whether guessing pays now."""
        if len(self._recent.get(0, ())) < TIMED_PLAIN_STEPS:  # plain steps first: the yardstick
            return 0, 1
        self.countdown -= 1
        if self.countdown > 0:
            return self.k, 1
        if self._guessing_pays():
            self.probe_after, self.stretches, self.countdown = FIRST_PROBE, 0, DECIDE_EVERY
            return self.k, 1
        if self.stretches == self.probe_after:  # guess again, less often each time it did not pay
            self.stretches, self.probe_after = 0, self.probe_after * 2
            self.verified.clear()  # judged on its own steps, from k = 1 (the cheapest) upwards
            self.countdown, self.k, self.judge_after = PROBE_STEPS, 1, PROBE_STEPS
            return self.k, 1
        self.stretches += 1
        self.countdown = 1
        return 0, PLAIN_STRETCH

    def _guessing_pays(self) -> bool:
        """Whether recent verify steps emitted a row's tokens faster than plain steps do (presumed so until
        `judge_after` of them are done: one early miss says little)."""
        if len(self.verified) < self.judge_after:
            return True
        tokens = sum(emitted for emitted, _ in self.verified)
        seconds = sum(self.step_seconds[width] for _, width in self.verified)
        return tokens / seconds > 1 / self.step_seconds[0]


def read_draws(sequences: list[Continuation], count: int) -> np.ndarray | None:
    """Each row's next `count` draws, (rows, count), read ahead so that the draft can guess what each row will
    sample and `verify` picks with them; a greedy row's are zeros. None when every row is greedy."""
    sampled = [row for row, sequence in enumerate(sequences) if sequence.stream is not None]
    if not sampled:
        return None
    draws = np.zeros((len(sequences), count))
    draws[sampled] = [sequences[row].stream.random(count) for row in sampled]
    return draws


def give_back_draws(sequences: list[Continuation], draws: np.ndarray | None) -> None:
    """Return every draw `read_draws` read to its row's stream."""
    if draws is not None:
        for sequence in sequences:
            if sequence.stream is not None:
                give_back(sequence.stream, draws.shape[1])


def give_back(stream: np.random.Generator, count: int) -> None:
    """Undo the last `count` draws of `stream`, so that its next draw is the first of them again. A PCG64
    stream (what `Sampler.streams` makes) steps back by advancing a whole period less `count`."""
    if count:
        stream.bit_generator.advance(PCG64_PERIOD - count)


PCG64_PERIOD = 2 ** 128
