"""The scheduler of `minigpt serve`: continuous batching on one thread that owns the engine.

Each loop it runs one step for every row in the batch (`minigpt.decoding`'s
`Step`: a token a row, or with speculation several), hands each request its
new text, frees the rows of requests that finished, stopped or were
cancelled, and prefills waiting requests into the free rows, handing out
their first tokens: a request joins the running batch at the next step and
leaves it the step it is done. `minigpt.rows.Rows` keeps the rows packed
(each row's sequence is a request's `Choice`) and restarts rows past the
block size as `minigpt generate` does, and the step is the one `generate`
uses, so a request gets the same text as `minigpt generate` with or without
a draft. Each row samples from its own seeded stream, so a request's text
depends on its prompt, parameters and seed alone, never on what shares the
batch.

The scheduler only schedules: requests come parsed (`protocol`), events go
to each request's asyncio queue for the HTTP layer to write, and what is
worth counting goes to an observer (`metrics`).
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from minigpt.decoding import Continuation, Engine, PlainStep, Step, pick
from minigpt.scoring import log_softmax, score
from minigpt.serve.protocol import CompletionRequest, RequestError, Scores, top_tokens
from minigpt.serve.stop_strings import StopMatcher
from minigpt.subword import token_offsets, token_strings
from minigpt.tokenizer import CharTokenizer


@dataclass(eq=False, kw_only=True)
class Choice(Continuation):
    """One sequence of a request (a `Continuation`, with what the server hands out): one row while it runs."""

    job: Job
    index: int
    stops: StopMatcher
    decode: Callable[[int | None], str]  # each next token's text (`tokenizer.pieces()`: this choice's own)
    text_base: int  # the prompt's length in characters: where the completion's text offsets start
    scored: list | None = None  # (logprob, top) of each generated token, when the request asked for them
    text: str = ""
    offsets: list[int] = field(default_factory=list)  # where each token's text starts in `text`
    sent: int = 0  # characters of `text` handed out; the rest may yet begin a stop string
    scores_sent: int = 0  # tokens whose scores were handed out
    finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.job.cancelled

    def fail(self, error: Exception) -> None:
        self.job.fail(f"sampling failed for this request: {error!r}")

    def add(self, tokens: list[int], scored: list | None = None) -> tuple[str, list[int]]:
        """Take generated tokens (and each one's log-probabilities) up to the first that ends the choice, a stop
        string ending inside a token's text cutting it there; return the new text that can be handed out now and
        the tokens whose scores go with it (setting finish_reason when done)."""
        for position, token in enumerate(tokens):
            self.tokens.append(token)
            self.offsets.append(len(self.text))
            if self.scored is not None:
                self.scored.append(scored[position])
            for char in self.decode(token):
                self.text += char
                stop = self.stops.feed(char)
                if stop is not None:
                    self.text, self.finish_reason = self.text[:-len(stop)], "stop"
                    break
            if not self.finish_reason and self.sampler.reads_text and self.sampler.finished(self):
                self.finish_reason = "stop"  # the pattern allows nothing more: the text is whole
            if not self.finish_reason and len(self.tokens) == self.max_new_tokens:
                self.text += self.decode(None)  # a character the last token left unfinished
                self.finish_reason = "length"
            if self.finish_reason:
                break
        return self._hand_out()

    def _hand_out(self) -> tuple[str, range]:
        """The text not yet handed out that can be, and which tokens' scores go with it."""
        end, tokens = len(self.text), len(self.tokens)
        if self.finish_reason != "length":
            if not self.finish_reason and self.stops.held_back:  # what may begin a stop string waits, and a
                # piece ends where a token's text does, so that its scores name whole tokens
                end = self.offsets[bisect.bisect_right(self.offsets, end - self.stops.held_back) - 1]
            tokens = bisect.bisect_left(self.offsets, end)  # a token with no text yet goes with the next
        start, first = self.sent, self.scores_sent
        self.sent, self.scores_sent = max(start, end), max(first, tokens)
        return self.text[start:end], range(first, tokens)


@dataclass
class Job:
    """A request in the scheduler; events go to its asyncio queue as lists of (index, text, finish_reason,
    scores or None)."""

    request: CompletionRequest
    loop: asyncio.AbstractEventLoop
    tokenizer: object  # the model's: each choice decodes its own tokens
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    first_token_at: float | None = None
    choices: list[Choice] = field(default_factory=list)

    def __post_init__(self):
        request = self.request
        streams = request.sampler.streams(request.n * len(request.prompt_ids))  # as `generate --num-samples`
        scored = request.logprobs is not None
        lengths = [len(self.tokenizer.decode(ids)) for ids in request.prompt_ids]
        self.choices = [Choice(prompt=request.prompt_ids[i // request.n], sampler=request.sampler, stream=stream,
                               max_new_tokens=request.max_tokens, job=self, index=i, stops=StopMatcher(request.stop),
                               decode=self.tokenizer.pieces(), text_base=lengths[i // request.n],
                               scored=[] if scored else None) for i, stream in enumerate(streams)]

    def cancel(self) -> None:
        self.cancelled = True

    def fail(self, message: str) -> None:
        """End this request alone with a 500 saying `message`."""
        if not self.cancelled:
            self.cancel()
            self.loop.call_soon_threadsafe(self.events.put_nowait, RuntimeError(message))

    @property
    def completion_tokens(self) -> int:
        return sum(len(choice.tokens) for choice in self.choices)


def _hand_out(events: list[tuple[Job, list]]) -> None:
    for job, batch in events:
        job.events.put_nowait(batch)


class Scheduler:
    """Owns the engine; runs continuous batching on its own thread (see the module's docstring)."""

    def __init__(self, engine: Engine, tokenizer: CharTokenizer, max_batch: int, max_queue: int, observer,
                 step: Step | None = None):
        """step: how each step finds the rows' next tokens (`minigpt.speculative.SpeculativeStep` speculates)."""
        self.tokenizer, self.max_batch, self.max_queue, self.observer = tokenizer, max_batch, max_queue, observer
        self.step = step or PlainStep()
        self.names = token_strings(tokenizer)  # each id's text, as logprobs name it
        self.vocabulary = np.array(self.names, dtype=object)  # the same, to look up many at once
        self.rows = self.step.rows(engine, max_batch)  # rows.sequences[i]: the Choice in row i
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
                jobs = {id(choice.job): choice.job for choice in self.rows.sequences} | \
                    {id(job): job for job in self.waiting}
                self.stopping = True
            for job in jobs.values():
                job.loop.call_soon_threadsafe(job.events.put_nowait, RuntimeError(f"the engine failed: {exc!r}"))
            raise

    def _loop(self) -> None:
        pending = np.zeros(0, dtype=np.int64)  # each row's newest token, which the next step writes
        while self._wait_for_work():
            if self.rows.count:
                pending = self._step(pending)
            if not self.rows.count:
                self.last_step_at = None
            pending = self._admit(pending)
            self._run_calls()
            self.observer.rows_in_use.set(self.rows.count)
            if self.rows.count:
                self.observer.batch_rows.observe(self.rows.count)
        for choice in self.rows.sequences:  # stopped with work in flight: its requests end
            choice.job.cancel()
        for _, future in self.calls:
            future.cancel()

    def _wait_for_work(self) -> bool:
        """Sleep while there is nothing to do; False once the scheduler is stopping."""
        with self.wake:
            while not self.stopping and not self.waiting and not self.rows.count and not self.calls:
                self.wake.wait()
            return not self.stopping

    def _step(self, pending: np.ndarray) -> np.ndarray:
        """Find every row's next tokens (one, or several in a verify step), deliver them, free the rows that are
        done; return the rows' pending tokens."""
        emitted, logits = self.step(self.rows, pending)
        if logits.shape[1] > 1:
            self.observer.verify_steps.inc()
        self._deliver(emitted, logits)
        pending = np.array([new[-1] for new in emitted], dtype=np.int64)
        return self.rows.remove(self._done(), carry=pending)

    def _done(self) -> list[int]:
        return [row for row, choice in enumerate(self.rows.sequences) if choice.done]

    def _logprobs(self, choices: tuple[Choice, ...], logits: np.ndarray, tokens: list[list[int]]) -> list:
        """Of each choice whose request asked, for each of its new tokens (choice i's j-th token read at
        logits[i, j]): the model's log-probability of it and its likeliest tokens (temperature 1, whatever the
        request samples with, as OpenAI documents); None for the other choices."""
        counts = [choice.job.request.logprobs for choice in choices]
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
        """Each row's first counts[i] likeliest tokens as {token: logprob}, the tokens of every row looked up at
        once."""
        return [dict(zip(names[:count], values[:count])) for names, values, count in
                zip(self.vocabulary[top_ids].tolist(), top_logprobs.tolist(), counts)]

    def _deliver(self, tokens: list[list[int]], logits: np.ndarray, first_row: int = 0, step: bool = True) -> None:
        """Hand the new tokens of rows first_row.. (picked from `logits`, as a step returns them) to their
        requests; `step`: these are a step's (they time it). A row's guesses may run past its max_tokens or a
        stop string: only what the requests took is counted."""
        now = time.perf_counter()
        if step:
            if self.last_step_at is not None:  # every row that was in the last step waited this long for its token
                self.observer.inter_token_latency.observe(now - self.last_step_at)
            self.last_step_at = now
        choices = self.rows.sequences[first_row:]
        events: dict[int, tuple[Job, list]] = {}
        taken, guessed = 0, 0
        for choice, row_tokens, row_scores in zip(choices, tokens, self._logprobs(choices, logits, tokens)):
            job = choice.job
            if choice.done:
                continue
            if job.first_token_at is None:
                job.first_token_at = now
                self.observer.time_to_first_token.observe(now - job.arrived)
            before = len(choice.tokens)
            piece, scored = choice.add(row_tokens, row_scores)
            piece_scores = self._scores(choice, scored) if choice.scored is not None else None
            taken += len(choice.tokens) - before
            guessed += min(len(choice.tokens) - before, len(row_tokens) - 1)  # all but the last were guesses
            if piece or choice.finish_reason:
                events.setdefault(id(job), (job, []))[1].append((choice.index, piece, choice.finish_reason,
                                                                  piece_scores))
        self.observer.tokens.inc(taken)
        self.observer.draft_tokens.inc(guessed)
        self._send(events)

    @staticmethod
    def _send(events: dict[int, tuple[Job, list]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, batch in events.values():
            by_loop.setdefault(job.loop, []).append((job, batch))
        for loop, batches in by_loop.items():  # one wake-up of the event loop a step, not one per request
            loop.call_soon_threadsafe(_hand_out, batches)

    def _admit(self, pending: np.ndarray) -> np.ndarray:
        """Prefill waiting jobs into free rows, oldest first, and hand out each new row's first token; return
        every row's pending token."""
        jobs, free = [], self.max_batch - self.rows.count
        with self.wake:  # taken off the queue under the lock, prefilled outside it
            while self.waiting and (self.waiting[0].cancelled or len(self.waiting[0].choices) <= free):
                job = self.waiting.popleft()
                if not job.cancelled:
                    jobs.append(job)
                    free -= len(job.choices)
            self.observer.queue_depth.set(len(self.waiting))
        if not jobs:
            return pending
        self._echo([job for job in jobs if job.request.echo or not job.request.max_tokens])
        jobs = [job for job in jobs if job.request.max_tokens]  # max_tokens 0: scored (or empty) and done
        if not jobs:
            return pending
        # One prefill for every new row, sorted by length so that prompts of one length run as one batch.
        joining = sorted((choice for job in jobs for choice in job.choices), key=lambda choice: len(choice.prompt))
        first_row = self.rows.count
        logits = self.rows.add([choice.prompt for choice in joining], joining)
        first = pick(logits, joining)
        self._deliver([[token] for token in first.tolist()], logits[:, None], first_row, step=False)
        return self.rows.remove(self._done(), carry=np.concatenate([pending, first]))

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
                    scores = scored.get(key, Scores([], [], []))
                events.setdefault(id(job), (job, []))[1].append((choice.index, text, reason, scores))
        self._send(events)

    def _prompt_scores(self, prompt: list[int], top: int, free: int) -> Scores:
        top_ids, top_logprobs = np.zeros((len(prompt) - 1, top), dtype=np.int64), np.zeros((len(prompt) - 1, top))

        def keep_top(start: int, window: np.ndarray) -> None:
            top_ids[start:start + len(window)], top_logprobs[start:start + len(window)] = top_tokens(window, top)

        logprobs = score(self.rows.engine, prompt, first_row=self.rows.count, rows=free, each_window=keep_top)
        tops = self._top_dicts(top_ids, top_logprobs, [top] * len(logprobs))
        entries = [(None, None)] + list(zip(logprobs.tolist(), tops))
        return Scores(token_offsets(self.tokenizer, prompt), self.vocabulary[prompt].tolist(), entries)

    def _scores(self, choice: Choice, tokens: range) -> Scores:
        """The scores of a choice's tokens, offsets counted from the start of its prompt's text."""
        names, offsets, ids = self.names, choice.offsets, choice.tokens
        return Scores([choice.text_base + offsets[i] for i in tokens], [names[ids[i]] for i in tokens],
                      choice.scored[tokens.start:tokens.stop])
