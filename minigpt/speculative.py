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

How far to guess is the draft's call and the measured speed's: a draft that
knows how sure it is (the n-gram table's greedy guesses) stops once it is
unsure and, for a row alone, may otherwise go on to the most a step
verifies (`max_tokens`); other guesses stop at k, which starts at a few,
grows after a step whose every guess was kept and shrinks after a miss (as
HuggingFace's assisted generation schedules it); and while verify steps
emit tokens more slowly than plain steps do (a poor draft, random weights)
decoding runs plain steps, guessing again now and then to notice a draft
that helps again. In a batch, where every row pays for the widest guess,
only guesses that stop themselves are made, up to k; rows find tokens at
their own pace, and a row that has all it needs leaves the batch.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np

from minigpt.config import DRAFT_TOKENS
from minigpt.decoding import Rows
from minigpt.sampling import Sampler, give_back, read_ahead

DECIDE_EVERY = 4  # verify steps between comparisons with plain decoding
# Where k starts: guesses no draft vouches for (sampled ones) were slower from more (trained default model,
# T 0.8, top-p 0.95: starting at 12, 0.96x; at 6 the same whether k may grow to 12 or to 32).
FIRST_GUESSES = 6
# Verify steps a probe takes before it is judged: k = 1, then 3 (guesses that stop themselves take as many as
# the draft is sure of, as always).
PROBE_STEPS = 2
PLAIN_STRETCH = 16  # plain steps run as one stretch, exactly plain decoding's loop, when guessing does not pay
FIRST_PROBE = 1  # plain stretches before guessing again, to notice a draft that helps now; doubled after each
TIMED_PLAIN_STEPS = 2  # of each stretch: enough to keep the yardstick current
RECENT_STEPS = 8  # what guessing and plain steps achieve is judged from this many recent steps of each


DRAFT_CHOICES = ("auto", "ngram", "context", "none")  # or a smaller model's file


def make_speculator(choice: str, ngram, max_tokens: int = DRAFT_TOKENS, draft_engine=None) -> "Speculator | None":
    """The speculator for --draft: "none", "ngram" (the model's table), "context", "auto" (the table when
    there is one, else context), or a draft model's file, whose engine is `draft_engine`."""
    from minigpt.drafts import ContextDraft, ModelDraft
    from minigpt.errors import MiniGPTError

    if choice == "none":
        return None
    if draft_engine is not None:
        return Speculator(ModelDraft(draft_engine), max_tokens)
    if choice == "ngram" and ngram is None:
        raise MiniGPTError("this model carries no n-gram draft table (it was trained before minigpt stored one); "
                           "use --draft context, or train it again")
    draft = ngram if choice in ("ngram", "auto") and ngram is not None else ContextDraft()
    return Speculator(draft, max_tokens)


class Speculator:
    """Speculative decoding with one draft, up to `max_tokens` guesses a step; counts what it did."""

    def __init__(self, draft, max_tokens: int = DRAFT_TOKENS):
        self.draft, self.max_tokens = draft, max_tokens
        self._stops_itself = getattr(draft, "stops_itself", lambda sampler: False)
        self.steps, self.tokens = 0, 0  # verify steps, and the tokens rows emitted in them (per row)
        self.plain_steps = 0
        self.k = min(max_tokens, FIRST_GUESSES)  # the most guesses a row the draft does not vouch for takes next
        # A step's cost by how many guesses it verified (0: a plain step): the least of its recent times, since
        # this host's noise only ever adds time (and a width's first call may build the engine's binding).
        self.step_seconds: dict[int, float] = {}
        self._recent: dict[int, deque] = {}
        self.verified: deque = deque(maxlen=RECENT_STEPS)  # recent verify steps: (tokens a row emitted, width)
        self.countdown, self.stretches, self.probe_after = 0, 0, FIRST_PROBE
        self.judge_after = DECIDE_EVERY  # verify steps timed before guessing is judged (a probe's: fewer)

    def pays(self, engine, samplers: Sequence[Sampler]) -> bool:
        """Whether guessing can pay for rows sampled by `samplers` on `engine`: for a row alone; in a batch, whose
        rows all pay for the widest guess, only for guesses that stop themselves where unsure (the table's greedy
        ones; trained default model, onnxruntime, batch 8: 1.2x plain, where sampled guesses made 0.84x and
        context lookup 0.77x) on an engine that verifies a batch in one call (not a graph exported before
        onnxruntime took `query_seqlens`, which verifies a row per call)."""
        if len(samplers) == 1:
            return True
        return getattr(engine, "verifies_rows_together", True) and any(map(self._stops_itself, samplers))

    @property
    def tokens_per_step(self) -> float:
        """Tokens a row emitted per engine call, plain steps included."""
        return (self.tokens + self.plain_steps) / max(1, self.steps + self.plain_steps)

    def report(self) -> str:
        if not self.steps + self.plain_steps:
            return (f"off for this batch (in a batch only greedy rows guess, on an engine that verifies a batch in "
                    f"one call; {self.draft.name} draft)")
        verified = f"{self.tokens / self.steps:.2f} a verify step, " if self.steps else ""
        return (f"{self.tokens_per_step:.2f} tokens per step ({verified}{self.plain_steps} plain steps; "
                f"{self.draft.name} draft, k <= {self.max_tokens})")

    def decode(self, rows: Rows, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               sampler: Sampler) -> Iterator[np.ndarray]:
        """Yield (rows,) ids step by step, as `minigpt.decoding.generate_rows` does without a draft. Rows find
        tokens at their own pace; one that has found all it needs leaves the batch (running on, it would only
        slow the others down, and restart at the end of the block for tokens nobody asked for)."""
        if max_new_tokens == 0:
            return
        all_streams = sampler.streams(len(prompts))
        pending = sampler(rows.add(prompts, payloads=range(len(prompts))), all_streams)  # not yet in the cache
        found = Found(len(prompts), max_new_tokens)
        yield from found.one_each(rows.payloads, pending)
        streams = all_streams
        while True:
            done = [row for row, sequence in enumerate(rows.payloads) if not found.left(sequence)]
            if done:
                pending = rows.remove(done, carry=pending)
                streams = [all_streams[sequence] for sequence in rows.payloads]
            if not rows.count:
                return
            k, plain = self.choose_k()
            emitted = self._verify_step(rows, pending, k, sampler, streams) if k else None
            if emitted is None:
                steps = min(plain, *map(found.left, rows.payloads))
                for pending in self._plain_steps(rows, pending, sampler, streams, steps):
                    yield from found.one_each(rows.payloads, pending)
            else:
                pending = np.array([tokens[-1] for tokens in emitted], dtype=np.int64)
                yield from found.step(rows.payloads, emitted)

    def _plain_steps(self, rows: Rows, pending: np.ndarray, sampler: Sampler, streams: list,
                     steps: int) -> Iterator[np.ndarray]:
        """Each row's next token after each of `steps` plain steps; the first few are timed, the rest are
        plain decoding's loop and nothing more."""
        self.plain_steps += steps
        for step in range(steps):
            started = time.perf_counter() if step < TIMED_PLAIN_STEPS else None
            pending = sampler(rows.decode(pending), streams)
            if started is not None:  # a step and its pick: the yardstick guessing is weighed against
                self.record(0, time.perf_counter() - started)
            yield pending

    def plain_step(self, rows: Rows, pending: np.ndarray) -> np.ndarray:
        """`rows.decode(pending)`, timed: the yardstick guessing is weighed against (for a caller that picks
        tokens from these logits later, and so times verify steps without their picks too)."""
        started = time.perf_counter()
        logits = rows.decode(pending)
        self.record(0, time.perf_counter() - started)
        self.plain_steps += 1
        return logits

    def _verify_step(self, rows: Rows, pending: np.ndarray, k: int, sampler: Sampler,
                     streams: list) -> list[list[int]] | None:
        """Write each row's next token and up to k guesses after it, verify them; return each row's emitted
        tokens (its new pending one last), or None when there is nothing to verify (a plain step then)."""
        started = time.perf_counter()
        extended = self.extend(rows, pending, k, [sampler] * rows.count, streams)
        if extended is None:
            return None
        lengths, guesses, logits, draws = extended
        accepted, emitted = verify(logits, guesses, sampler, streams, draws)
        # Timed with its picks: picking k + 1 positions costs more than one (sampling: ~50 us more here).
        self.settle(rows, lengths, guesses, accepted, time.perf_counter() - started)
        return emitted

    def extend(self, rows: Rows, pending: np.ndarray, k: int, samplers: list[Sampler],
               streams: list) -> tuple[list[int], list[list[int]], np.ndarray, np.ndarray | None] | None:
        """Write each row's next token and the draft's guesses after it (up to k) in one extend: return each
        row's length before, its guesses, the (rows, k' + 1, V) logits and the draws read ahead for them (see
        `read_draws`); None when there is nothing to guess (or no room for it), so that the caller runs a plain
        step. Each row samples with samplers[i] from streams[i]; a sampling row's draft sees its next draws. A row
        whose guesses stop themselves where unsure may take up to max_tokens when it is alone; in a batch only such
        rows guess."""
        stops = [self._stops_itself(sampler) for sampler in samplers]
        # A call is as wide as a batch's longest guess, and every row pays for it: in a batch only guesses that
        # stop themselves are made (see `pays`), and they follow the schedule's k (trained default model, batch
        # 8: 1.18x plain; up to the most, 0.98x, widths 9 to 33 for the one row that was sure).
        alone = rows.count == 1
        reach = self.max_tokens if alone and stops[0] else k
        if rows.room <= reach:  # too close to the end of the block: full rows restart first
            reach = min(reach, rows.make_room() - 1)
            if reach < 1:  # a row is one token from the end: its next token restarts it, in a plain step
                return None
        lengths = rows.lengths[:rows.count].tolist()
        for row, length in enumerate(lengths):
            rows.tokens[row, length] = pending[row]  # where extend writes it: the draft reads it there
        histories = [rows.tokens[row, :length + 1] for row, length in enumerate(lengths)]
        draws = read_draws(samplers, streams, reach + 1)
        limits = [reach] if alone else [reach if stop else 0 for stop in stops]
        guesses = self._propose(histories, limits, draws, samplers)
        k = max(map(len, guesses))
        if k == 0:  # nothing to verify: as good as a plain step, which is what guessing is judged against
            give_back_draws(samplers, streams, draws)
            self.verified.append((1, 0))
            return None
        # A short guess is padded (and the padding not verified); one list, one array: cheaper than filling rows.
        logits = rows.extend(np.array([[first, *guess] + [0] * (k - len(guess))
                                       for first, guess in zip(pending.tolist(), guesses)], dtype=np.int64))
        return lengths, guesses, logits, draws

    def _propose(self, histories: list[np.ndarray], limits: list[int], draws: np.ndarray | None,
                 samplers: list[Sampler]) -> list[list[int]]:
        """Each row's guesses, up to limits[row]: a draft model's for every row in one batch (as many for each),
        the others' a row at a time."""
        if hasattr(self.draft, "propose_rows"):
            return self.draft.propose_rows(histories, max(limits), draws, samplers)
        return [self.draft.propose(history, limit, None if draws is None else draws[row], sampler)
                for row, (history, limit, sampler) in enumerate(zip(histories, limits, samplers))]

    def settle(self, rows: Rows, lengths: list[int], guesses: list[list[int]], accepted: list[int],
               seconds: float) -> None:
        """Roll each row back to its next token and the guesses it accepted; count what the step, timed by the
        caller (`seconds`), achieved; choose the next step's k: two more after a step whose every guess was
        kept (the draft may be able to say more), one fewer after a miss."""
        rows.roll_back([length + 1 + kept for length, kept in zip(lengths, accepted)])
        emitted = 1 + sum(accepted) / len(accepted)  # tokens a row emitted, on average
        self.steps += 1
        self.tokens += emitted
        width = max(map(len, guesses))
        self.record(width, seconds)
        self.verified.append((emitted, width))
        every_guess_kept = all(kept == len(guess) for guess, kept in zip(guesses, accepted))
        self.k = min(self.max_tokens, self.k + 2) if every_guess_kept else max(1, self.k - 1)

    def record(self, width: int, seconds: float) -> None:
        """What a step verifying `width` guesses took (0: a plain step), as the caller timed it."""
        recent = self._recent.setdefault(width, deque(maxlen=RECENT_STEPS))
        recent.append(seconds)
        self.step_seconds[width] = min(recent)

    def choose_k(self) -> tuple[int, int]:
        """(k, plain steps to run if k is 0 or the draft has nothing to guess): guess while verify steps emit
        tokens faster than plain steps, judged again every DECIDE_EVERY verify steps; else a stretch of
        PLAIN_STRETCH plain steps, with a few verify steps now and then to see whether guessing pays now."""
        if len(self._recent.get(0, ())) < TIMED_PLAIN_STEPS:  # plain steps first: the yardstick guessing is
            return 0, 1                                      # weighed against (the first may build a binding)
        self.countdown -= 1
        if self.countdown > 0:
            return self.k, 1
        if self._guessing_pays():
            self.probe_after, self.stretches, self.countdown = FIRST_PROBE, 0, DECIDE_EVERY
            return self.k, 1
        if self.stretches == self.probe_after:  # guess again, less often each time it did not pay: a useless
            self.stretches, self.probe_after = 0, self.probe_after * 2  # draft costs less and less
            self.verified.clear()  # judged on its own steps, from k = 1 (the cheapest) upwards
            self.countdown, self.k, self.judge_after = PROBE_STEPS, 1, PROBE_STEPS
            return self.k, 1
        self.stretches += 1
        self.countdown = 1
        return 0, PLAIN_STRETCH

    def _guessing_pays(self) -> bool:
        """Whether recent verify steps emitted a row's tokens faster than plain steps do (presumed so until
        DECIDE_EVERY are done, or a probe's PROBE_STEPS: one early miss says little)."""
        if len(self.verified) < self.judge_after:
            return True
        tokens = sum(emitted for emitted, _ in self.verified)
        seconds = sum(self.step_seconds[width] for _, width in self.verified)
        return tokens / seconds > 1 / self.step_seconds[0]


class Found:
    """The tokens each of `count` sequences has found, handed out a step at a time (every sequence's next token
    together, as plain decoding yields them) up to `wanted` each."""

    def __init__(self, count: int, wanted: int):
        self.queues = [deque() for _ in range(count)]  # found, not yet handed out
        self.wanted, self.given = wanted, 0

    def step(self, sequences: Sequence[int], tokens: Sequence[Sequence[int]]) -> Iterator[np.ndarray]:
        """Take each sequence's new tokens (sequence i's: tokens[i]); yield every step now complete."""
        for sequence, new in zip(sequences, tokens):
            self.queues[sequence].extend(new)
        while self.given < self.wanted and all(self.queues):
            yield np.array([queue.popleft() for queue in self.queues], dtype=np.int64)
            self.given += 1

    def one_each(self, sequences: Sequence[int], ids: np.ndarray) -> Iterator[np.ndarray]:
        """Take one token for each sequence (sequences[i]'s: ids[i]), as a plain step finds them."""
        if not any(self.queues):  # no row is ahead (so none has left): plain decoding's own loop
            self.given += 1
            yield ids.copy()
        else:
            yield from self.step(sequences, ids[:, None].tolist())

    def left(self, sequence: int) -> int:
        return max(0, self.wanted - self.given - len(self.queues[sequence]))


def read_draws(samplers: list[Sampler], streams: list, count: int) -> np.ndarray | None:
    """Each row's next `count` draws, read ahead as (rows, count) so that the draft can guess what each row
    will sample and `verify` picks with them; a greedy row reads none (zeros). None when every row is greedy."""
    sampled = [row for row, sampler in enumerate(samplers) if not sampler.greedy]
    if len(sampled) == len(samplers):
        return read_ahead(streams, count)
    if not sampled:
        return None
    draws = np.zeros((len(samplers), count))
    draws[sampled] = read_ahead([streams[row] for row in sampled], count)
    return draws


def give_back_draws(samplers: list[Sampler], streams: list, draws: np.ndarray | None) -> None:
    """Return every draw `read_draws` read to its row's stream."""
    if draws is None:
        return
    for sampler, stream in zip(samplers, streams):
        if not sampler.greedy:
            give_back(stream, draws.shape[1])


def verify(logits: np.ndarray, guesses: list[list[int]], sampler: Sampler, streams: list, draws: np.ndarray | None,
           own_pick: bool = True) -> tuple[list[int], list[list[int]]]:
    """For (rows, k + 1, V) logits and each row's guesses (up to k): how many guesses each row accepts, and the
    tokens it emits (its picks: the accepted guesses, then, with `own_pick`, the model's own). One draw per
    emitted token, as plain decoding: every position is picked at once with the draw plain decoding would use
    there (`draws`, read ahead by `read_draws`, at least k + 1 a row; None when greedy), and the draws no token
    is emitted for are given back to the row's stream (without `own_pick`, the next step picks that position again, from
    the logits there, with the same draw)."""
    rows, positions = logits.shape[:2]
    if sampler.greedy:
        picks = logits.argmax(axis=-1).tolist()
    else:
        picks = sampler.pick(logits.reshape(rows * positions, -1),
                             draws[:, :positions].reshape(-1)).reshape(rows, positions).tolist()
    accepted = []
    for row_picks, row_guesses in zip(picks, guesses):  # a few tokens: lists beat numpy calls here
        kept, most = 0, len(row_guesses)
        while kept < most and row_picks[kept] == row_guesses[kept]:
            kept += 1
        accepted.append(kept)
    if not sampler.greedy:
        for stream, kept in zip(streams, accepted):
            give_back(stream, draws.shape[1] - kept - own_pick)
    return accepted, [row_picks[:kept + own_pick] for row_picks, kept in zip(picks, accepted)]
