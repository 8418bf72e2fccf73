"""The scheduler of `minigpt serve`: continuous batching on one thread that owns the engine.

Each step it samples a token for every row in the batch, hands each request
its new text, frees the rows of requests that finished, stopped or were
cancelled, runs one decode step for the rows left, and prefills waiting
requests into the free rows: a request joins the running batch at the next
step and leaves it the step it is done. `minigpt.decoding.Rows` keeps the
rows packed (each row's payload is its request and choice) and applies the
same policy past the block size as `minigpt generate`. Each row samples
from its own seeded stream, so a request's text depends on its prompt,
parameters and seed alone, never on what shares the batch.

With a draft, the decode step may be a verify step (`minigpt.speculative`):
each row writes its token and the draft's guesses in one extend and hands out
every guess that equals what it samples there with its own draws; its next
token is then sampled in the next step, from the logits after its last
accepted guess, exactly as without a draft. So the text is the same with or
without one, and the loop keeps its shape: sample, deliver, step.

The scheduler only schedules: requests come parsed (`protocol`), events go
to each request's asyncio queue for the HTTP layer to write, and what is
worth counting goes to an observer (`metrics`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from minigpt.config import DRAFT_TOKENS
from minigpt.decoding import Engine, Rows
from minigpt.sampling import Sampler, rows_alike
from minigpt.scoring import log_softmax, score, top_tokens
from minigpt.serve.protocol import CompletionRequest, RequestError, Scores
from minigpt.serve.stop_strings import StopMatcher
from minigpt.speculative import Speculator, verify
from minigpt.tokenizer import CharTokenizer


@dataclass
class Choice:
    """One sequence of a request: one row of the batch while it runs."""

    index: int
    prompt: list[int]
    stream: np.random.Generator
    stops: StopMatcher
    scored: list | None = None  # (logprob, top) of each generated character, when the request asked for them
    text: str = ""
    sent: int = 0  # characters of `text` handed out; the rest may yet begin a stop string
    tokens: int = 0
    finish_reason: str | None = None

    def add(self, chars: str, max_tokens: int, scored: list | None = None) -> tuple[str, Scores | None]:
        """Take generated characters (and each one's log-probabilities), up to the first that ends the choice;
        return the new text that can be handed out now with its scores (setting finish_reason when done)."""
        for position, char in enumerate(chars):
            self.tokens += 1
            self.text += char
            if self.scored is not None:
                self.scored.append(scored[position])
            stop = self.stops.feed(char)
            if stop is not None:
                self.text, self.finish_reason = self.text[:-len(stop)], "stop"
            elif self.tokens == max_tokens:
                self.finish_reason = "length"
            if self.finish_reason:
                break
        end = len(self.text) if self.finish_reason else len(self.text) - self.stops.held_back
        start = self.sent
        piece, self.sent = self.text[start:end], max(start, end)
        if self.scored is None:
            return piece, None
        return piece, Scores(len(self.prompt) + start, list(piece), self.scored[start:start + len(piece)])


@dataclass
class Job:
    """A request in the scheduler; events go to its asyncio queue as lists of (index, text, finish_reason,
    scores or None)."""

    request: CompletionRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    first_token_at: float | None = None
    choices: list[Choice] = field(default_factory=list)

    def __post_init__(self):
        request = self.request
        streams = request.sampler.streams(request.n * len(request.prompt_ids))  # as `generate --num-samples`
        scored = request.logprobs is not None
        self.choices = [Choice(i, request.prompt_ids[i // request.n], stream, StopMatcher(request.stop),
                               [] if scored else None) for i, stream in enumerate(streams)]

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def completion_tokens(self) -> int:
        return sum(choice.tokens for choice in self.choices)


def _hand_out(events: list[tuple[Job, list]]) -> None:
    for job, batch in events:
        job.events.put_nowait(batch)


class Scheduler:
    """Owns the engine; runs continuous batching on its own thread (see the module's docstring)."""

    def __init__(self, engine: Engine, tokenizer: CharTokenizer, max_batch: int, max_queue: int, observer,
                 draft=None, draft_tokens: int = DRAFT_TOKENS):
        """draft: a `minigpt.drafts` draft for speculative decoding, or None."""
        self.tokenizer, self.max_batch, self.max_queue, self.observer = tokenizer, max_batch, max_queue, observer
        self.draft, self.draft_tokens = draft, draft_tokens
        self.speculators: dict[int, Speculator] = {}  # by batch size (powers of two): each learns its own k
        self.plain_left = 0  # plain steps to run before the speculator decides again
        self.vocabulary = np.array(tokenizer.chars, dtype=object)  # ids to characters, many at once
        self.rows = Rows(engine, max_batch)  # rows.payloads[i]: the (job, choice) in row i
        self.waiting: deque[Job] = deque()
        self.calls: deque[tuple] = deque()  # (fn, future): work on the engine's model from outside, between steps
        self.wake = threading.Condition()
        self.stopping = False
        self.last_step_at: float | None = None  # None: no step ran since the batch was last empty
        self.thread = threading.Thread(target=self._run, name="minigpt-scheduler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout=30)

    @property
    def healthy(self) -> bool:
        return self.thread.is_alive() and not self.stopping

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full."""
        with self.wake:
            if self.stopping:
                raise RequestError("the engine has stopped (see the server's log); restart the server",
                                   status=503, code="engine_stopped")
            if len(self.waiting) >= self.max_queue:
                return False
            self.waiting.append(job)
            self.observer.queue_depth.set(len(self.waiting))
            self.wake.notify()
        return True

    def call(self, fn) -> concurrent.futures.Future:
        """Run fn() on the scheduler's thread between two steps: whatever reads the engine's model (attention
        maps write into its layers) must not run beside a step."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.wake:
            if self.stopping:
                raise RequestError("the engine has stopped (see the server's log); restart the server",
                                   status=503, code="engine_stopped")
            self.calls.append((fn, future))
            self.wake.notify()
        return future

    def _run_calls(self) -> None:
        while self.calls:
            fn, future = self.calls.popleft()
            try:
                future.set_result(fn())
            except Exception as exc:  # the caller's to report; the engine is not hurt
                future.set_exception(exc)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug or an engine failure: every request in it ends with a 500
            with self.wake:
                jobs = {id(job): job for job, _ in self.rows.payloads} | {id(job): job for job in self.waiting}
                self.stopping = True
            for job in jobs.values():
                job.loop.call_soon_threadsafe(job.events.put_nowait, RuntimeError(f"the engine failed: {exc!r}"))
            raise

    def _loop(self) -> None:
        logits = np.zeros((0, 1), dtype=np.float32)
        while self._wait_for_work():
            if self.rows.count:
                logits = self._step(logits)
            if not self.rows.count:
                self.last_step_at = None
            logits = self._admit(logits)
            self._run_calls()
            self.observer.rows_in_use.set(self.rows.count)
            if self.rows.count:
                self.observer.batch_rows.observe(self.rows.count)
        for job, _ in self.rows.payloads:  # stopped with work in flight: its requests end
            job.cancel()
        for _, future in self.calls:
            future.cancel()

    def _wait_for_work(self) -> bool:
        """Sleep while there is nothing to do; False once the scheduler is stopping."""
        with self.wake:
            while not self.stopping and not self.waiting and not self.rows.count and not self.calls:
                self.wake.wait()
            return not self.stopping

    def _step(self, logits: np.ndarray) -> np.ndarray:
        """Sample every row, deliver, free the rows that are done, decode the rest; return their logits."""
        ids = self._sample(logits)
        self._deliver([[token] for token in ids.tolist()], self._logprobs(logits[:, None], ids[:, None]))
        ids = self.rows.remove(self._done(), carry=ids)
        return self._decode(ids) if self.rows.count else logits[:0]

    def _done(self) -> list[int]:
        return [row for row, (job, choice) in enumerate(self.rows.payloads) if choice.finish_reason or job.cancelled]

    def _rows_alike(self) -> list[tuple[list[int], Sampler]]:
        """The rows grouped by how they sample, each group with its sampler: a group is sampled as one batch."""
        return rows_alike(self._samplers())

    def _samplers(self) -> list[Sampler]:
        return [job.request.sampler for job, _ in self.rows.payloads]

    def _sample(self, logits: np.ndarray) -> np.ndarray:
        """One token per row, each row from its own stream; rows sampled alike are sampled as one batch."""
        running = self.rows.payloads
        ids = np.empty(len(running), dtype=np.int64)
        for rows, sampler in self._rows_alike():
            try:
                ids[rows] = sampler(logits[rows], [running[row][1].stream for row in rows])
            except Exception as exc:  # these requests alone fail (500); their rows are freed, the rest go on
                ids[rows] = 0
                self._fail_rows(rows, f"sampling failed for this request: {exc!r}")
        return ids

    def _fail_rows(self, rows: list[int], message: str) -> None:
        running = self.rows.payloads
        for job in {id(running[row][0]): running[row][0] for row in rows}.values():
            self._fail(job, message)

    def _decode(self, ids: np.ndarray) -> np.ndarray:
        """Append each row's token: one plain step, or, when the draft pays for a batch this size, a verify step
        (`minigpt.speculative`) that also hands out the guesses rows accept. Returns the next logits."""
        speculator = None
        if self.draft is not None and not self.plain_left:  # a plain stretch asks nothing of the draft
            samplers = self._samplers()
            speculator = self._speculator(samplers)
        if speculator is None:
            self.plain_left = max(0, self.plain_left - 1)
            return self.rows.decode(ids)
        k, plain = speculator.choose_k()
        started = time.perf_counter()
        streams = [choice.stream for _, choice in self.rows.payloads]
        extended = speculator.extend(self.rows, ids, k, samplers, streams) if k else None
        if extended is None:
            self.plain_left = plain - 1
            return speculator.plain_step(self.rows, ids)
        return self._verified(speculator, started, streams, *extended)

    def _speculator(self, samplers: list[Sampler]) -> Speculator | None:
        """The speculator for a batch this size, if guessing can pay for rows sampled by `samplers`."""
        size = self.rows.count.bit_length()  # step costs differ with the batch: learned per size
        if size not in self.speculators:
            self.speculators[size] = Speculator(self.draft, self.draft_tokens)
        speculator = self.speculators[size]
        return speculator if speculator.pays(self.rows.engine, samplers) else None

    def _verified(self, speculator: Speculator, started: float, streams: list, lengths: list[int],
                  guesses: list[list[int]], logits: np.ndarray, draws: np.ndarray | None) -> np.ndarray:
        """Deliver the guesses each row accepts (those equal to what it samples there with its own draws); the
        logits after them, where each row's next token is sampled in the next step as in plain decoding."""
        accepted = [0] * self.rows.count
        for rows, sampler in self._rows_alike():
            try:
                kept, _ = verify(logits[rows], [guesses[row] for row in rows], sampler,
                                 [streams[row] for row in rows], None if draws is None else draws[rows],
                                 own_pick=False)
            except Exception as exc:  # as in _sample: these requests alone fail
                self._fail_rows(rows, f"sampling failed for this request: {exc!r}")
                kept = [0] * len(rows)
            for row, count in zip(rows, kept):
                accepted[row] = count
        # Timed with the guesses' picks (delivering them is what plain steps pay later, untimed): as plain_step.
        speculator.settle(self.rows, lengths, guesses, accepted, time.perf_counter() - started)
        self.observer.verify_steps.inc()
        next_logits = logits[np.arange(len(accepted)), accepted]
        if any(accepted):
            tokens = [guess[:count] for guess, count in zip(guesses, accepted)]
            self.observer.draft_tokens.inc(self._deliver(tokens, self._logprobs(logits, tokens), step=False))
            next_logits = self.rows.remove(self._done(), carry=next_logits)
        return next_logits

    def _logprobs(self, logits: np.ndarray, tokens) -> list[list | None]:
        """Of each row whose request asked, for each of its tokens (row i's j-th token read at logits[i, j]):
        the model's log-probability of it and its likeliest tokens (temperature 1, whatever the request samples
        with, as OpenAI documents); None for the other rows."""
        running = self.rows.payloads
        counts = [job.request.logprobs for job, _ in running]
        wanted = [(row, position, int(token)) for row, count in enumerate(counts) if count is not None
                  for position, token in enumerate(tokens[row])]
        scored: list[list | None] = [None if count is None else [] for count in counts]
        if not wanted:
            return scored
        rows, positions, ids = (list(column) for column in zip(*wanted))
        logprobs = log_softmax(logits[rows, positions])
        chosen = logprobs[np.arange(len(wanted)), ids].tolist()
        tops = self._top_dicts(*top_tokens(logprobs, max(counts[row] for row in rows)), [counts[row] for row in rows])
        for row, logprob, top in zip(rows, chosen, tops):
            scored[row].append((logprob, top))
        return scored

    def _top_dicts(self, top_ids: np.ndarray, top_logprobs: np.ndarray, counts: list[int]) -> list[dict]:
        """Each row's first counts[i] likeliest tokens as {character: logprob}, the characters of every row
        looked up at once."""
        return [dict(zip(chars[:count], values[:count])) for chars, values, count in
                zip(self.vocabulary[top_ids].tolist(), top_logprobs.tolist(), counts)]

    @staticmethod
    def _fail(job: Job, message: str) -> None:
        if not job.cancelled:
            job.cancel()
            job.loop.call_soon_threadsafe(job.events.put_nowait, RuntimeError(message))

    def _deliver(self, tokens: list[list[int]], scored: list[list | None], step: bool = True) -> int:
        """Hand each row's new tokens to its request; `step`: these are the tokens of a new step (they time it).
        Returns how many the requests took (a row's guesses may run past its max_tokens or a stop string)."""
        now = time.perf_counter()
        if step:
            if self.last_step_at is not None:  # every row that was in the last step waited this long for its token
                self.observer.inter_token_latency.observe(now - self.last_step_at)
            self.last_step_at = now
        events: dict[int, tuple[Job, list]] = {}
        chars, taken = self.tokenizer.chars, 0
        for (job, choice), row_tokens, row_scores in zip(self.rows.payloads, tokens, scored):
            if job.cancelled or choice.finish_reason or not row_tokens:
                continue
            if job.first_token_at is None:
                job.first_token_at = now
                self.observer.time_to_first_token.observe(now - job.arrived)
            before = choice.tokens
            piece, piece_scores = choice.add("".join(chars[token] for token in row_tokens), job.request.max_tokens,
                                             row_scores)
            taken += choice.tokens - before
            if piece or choice.finish_reason:
                events.setdefault(id(job), (job, []))[1].append((choice.index, piece, choice.finish_reason,
                                                                  piece_scores))
        self.observer.tokens.inc(taken)
        self._send(events)
        return taken

    @staticmethod
    def _send(events: dict[int, tuple[Job, list]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, batch in events.values():
            by_loop.setdefault(job.loop, []).append((job, batch))
        for loop, batches in by_loop.items():  # one wake-up of the event loop a step, not one per request
            loop.call_soon_threadsafe(_hand_out, batches)

    def _admit(self, logits: np.ndarray) -> np.ndarray:
        """Prefill waiting jobs into free rows, oldest first; their rows' logits join the batch's."""
        jobs, free = [], self.max_batch - self.rows.count
        with self.wake:  # taken off the queue under the lock, prefilled outside it
            while self.waiting and (self.waiting[0].cancelled or len(self.waiting[0].choices) <= free):
                job = self.waiting.popleft()
                if not job.cancelled:
                    jobs.append(job)
                    free -= len(job.choices)
            self.observer.queue_depth.set(len(self.waiting))
        if not jobs:
            return logits
        self._echo([job for job in jobs if job.request.echo or not job.request.max_tokens])
        jobs = [job for job in jobs if job.request.max_tokens]  # max_tokens 0: scored (or empty) and done
        if not jobs:
            return logits
        # One prefill for every new row, sorted by length so that prompts of one length run as one batch.
        joining = sorted(((job, choice) for job in jobs for choice in job.choices), key=lambda j: len(j[1].prompt))
        new_logits = self.rows.add([choice.prompt for _, choice in joining], payloads=joining)
        return np.concatenate([logits, new_logits]) if len(logits) else new_logits

    def _echo(self, jobs: list[Job]) -> None:
        """Hand out each echoed prompt, scored in rows no sequence is using (`minigpt.scoring`, the windows of
        `minigpt eval`), and end the jobs that generate nothing."""
        events: dict[int, tuple[Job, list]] = {}
        free = self.max_batch - self.rows.count
        for job in jobs:
            request, scored = job.request, {}
            for choice in job.choices:
                reason = None if request.max_tokens else "length"
                text = self.tokenizer.decode(choice.prompt) if request.echo else ""
                scores = None
                if request.logprobs is not None:
                    key = tuple(choice.prompt)
                    if request.echo and key not in scored:  # the samples of one prompt share its scores
                        scored[key] = self._prompt_scores(choice.prompt, request.logprobs, free)
                    scores = scored.get(key, Scores(len(choice.prompt), [], []))
                events.setdefault(id(job), (job, []))[1].append((choice.index, text, reason, scores))
        self._send(events)

    def _prompt_scores(self, prompt: list[int], top: int, free: int) -> Scores:
        token_scores = score(self.rows.engine, prompt, first_row=self.rows.count, rows=free, top=top)
        tops = self._top_dicts(token_scores.top_ids, token_scores.top_logprobs, [top] * len(token_scores.logprobs))
        entries = [(None, None)] + list(zip(token_scores.logprobs.tolist(), tops))
        return Scores(0, list(self.tokenizer.decode(prompt)), entries)
