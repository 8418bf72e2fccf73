"""`minigpt serve`: an OpenAI-compatible completions server with continuous batching.

One scheduler thread owns the engine. Each step it samples a token for every
row in the batch, hands each request its new text, frees the rows of
requests that finished, stopped or were cancelled, runs one decode step for
the rows left, and prefills waiting requests into the free rows: a request
joins the running batch at the next step and leaves it the step it is done
(`minigpt.decoding.Rows` keeps the rows packed and applies the same policy
past the block size as `minigpt generate`). Each row samples from its own
seeded stream, so a request's text depends on its prompt, parameters and
seed alone, never on what shares the batch.

The HTTP side is Starlette on uvicorn: Starlette is the ASGI toolkit FastAPI
is built on, and this API is four routes whose validation must answer in
OpenAI's error shape with the CLI's own messages, which FastAPI's pydantic
layer would have to be worked around for; uvicorn brings the graceful
shutdown (stop accepting, finish in-flight requests within a deadline, then
cancel them). Nothing here imports torch: with an ONNX model the server
runs on onnxruntime and numpy alone.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from minigpt.decoding import Engine, Rows, prompt_ids
from minigpt.errors import MiniGPTError
from minigpt.sampling import Sampler
from minigpt.tokenizer import CharTokenizer

MAX_BODY_BYTES = 1 << 20
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
MAX_STOP_STRINGS = 4  # as OpenAI's API
UNSUPPORTED = {"logprobs": None, "echo": False, "suffix": None, "best_of": None, "frequency_penalty": 0,
               "presence_penalty": 0, "logit_bias": None}  # fields accepted only at their neutral value


class RequestError(Exception):
    """A bad request: answered with `status` and OpenAI's error body naming `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


# ---------------------------------------------------------------------------------------------------------------
# Requests


@dataclass
class CompletionRequest:
    """A validated /v1/completions body."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    max_tokens: int
    n: int
    stop: list[str]
    stream: bool
    include_usage: bool
    sampler: Sampler


def _typed(body: dict, name: str, kinds: tuple, default, what: str):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise RequestError(f"{name} must be {what}, got {json.dumps(value)[:40]}", name)
    return value


def parse_completion(body, tokenizer: CharTokenizer, *, model_id: str, max_batch: int,
                     max_tokens_limit: int) -> CompletionRequest:
    """Check a request body field by field; the first problem raises RequestError naming its field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError(f"model is required: the model served here is {model_id!r}", "model")
    if model != model_id:
        raise RequestError(f"the model {model!r} does not exist; this server serves {model_id!r}", "model", 404,
                           "model_not_found")
    prompt = body.get("prompt", "")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompt must be a string or a non-empty list of strings", "prompt")
    try:
        ids = [prompt_ids(tokenizer, p) for p in prompts]
    except MiniGPTError as exc:  # unknown characters: the CLI's message
        raise RequestError(str(exc), "prompt") from None
    max_tokens = _typed(body, "max_tokens", (int,), 16, "an integer")
    if not 1 <= max_tokens <= max_tokens_limit:
        raise RequestError(f"max_tokens must be from 1 to {max_tokens_limit}, got {max_tokens}", "max_tokens")
    n = _typed(body, "n", (int,), 1, "an integer")
    if not 1 <= n <= max_batch or n * len(prompts) > max_batch:
        raise RequestError(f"n × prompts must be from 1 to {max_batch} (this server's --max-batch), got "
                           f"{n} × {len(prompts)}", "n")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stop)):
        raise RequestError(f"stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them", "stop")
    stream = _typed(body, "stream", (bool,), False, "true or false")
    options = _typed(body, "stream_options", (dict,), {}, "an object")
    for name, neutral in UNSUPPORTED.items():
        if body.get(name, neutral) not in (neutral, None) and not (name == "best_of" and body[name] == n):
            raise RequestError(f"{name} is not supported by this server; leave it out", name)
    sampling = {"temperature": _typed(body, "temperature", (int, float), 1.0, "a number"),
                "top_k": _typed(body, "top_k", (int,), None, "an integer"),
                "top_p": _typed(body, "top_p", (int, float), None, "a number"),
                "seed": _typed(body, "seed", (int,), None, "an integer")}
    try:
        sampler = Sampler(**sampling)
    except MiniGPTError as exc:  # the CLI's checks and messages, which start with the field's name
        raise RequestError(str(exc), str(exc).split()[0]) from None
    return CompletionRequest(prompts, ids, max_tokens, n, stop, stream, bool(options.get("include_usage")), sampler)


# ---------------------------------------------------------------------------------------------------------------
# The scheduler


@dataclass
class Choice:
    """One sequence of a request: one row of the batch while it runs."""

    index: int
    prompt: list[int]
    stream: np.random.Generator
    text: str = ""
    sent: int = 0  # characters of `text` handed out; the rest may yet begin a stop string
    tokens: int = 0
    finish_reason: str | None = None


@dataclass
class Job:
    """A request in the scheduler; events go to its asyncio queue as lists of (index, text, finish_reason)."""

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
        self.choices = [Choice(i, request.prompt_ids[i // request.n], stream) for i, stream in enumerate(streams)]

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.request.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return sum(choice.tokens for choice in self.choices)


def _hand_out(events: list[tuple[Job, list]]) -> None:
    for job, batch in events:
        job.events.put_nowait(batch)


class Scheduler:
    """Owns the engine; runs continuous batching on its own thread (see the module's docstring)."""

    def __init__(self, engine: Engine, tokenizer: CharTokenizer, max_batch: int, max_queue: int, metrics):
        self.tokenizer, self.max_batch, self.max_queue, self.metrics = tokenizer, max_batch, max_queue, metrics
        self.rows = Rows(engine, max_batch)  # rows.payloads[i]: the (job, choice) in row i
        self.waiting: deque[Job] = deque()
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
            self.metrics.queue_depth.set(len(self.waiting))
            self.wake.notify()
        return True

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
        while True:
            with self.wake:
                while not self.stopping and not self.waiting and not self.rows.count:
                    self.wake.wait()
                if self.stopping:
                    break
            if self.rows.count:
                ids = self._sample(logits)
                self._deliver(ids)
                ids = self.rows.remove([row for row, (job, choice) in enumerate(self.rows.payloads)
                                        if choice.finish_reason or job.cancelled], carry=ids)
                logits = self.rows.decode(ids) if self.rows.count else logits[:0]
            if not self.rows.count:
                self.last_step_at = None
            logits = self._admit(logits)
            self.metrics.rows_in_use.set(self.rows.count)
            if self.rows.count:
                self.metrics.batch_rows.observe(self.rows.count)
        for job, _ in self.rows.payloads:  # stopped with work in flight: its requests end
            job.cancel()

    def _sample(self, logits: np.ndarray) -> np.ndarray:
        """One token per row, each row from its own stream; rows sampled alike are sampled as one batch."""
        running = self.rows.payloads
        ids = np.empty(len(running), dtype=np.int64)
        rows_alike: dict[tuple, list[int]] = {}
        for row, (job, _) in enumerate(running):
            sampler = job.request.sampler
            rows_alike.setdefault((sampler.temperature, sampler.top_k, sampler.top_p), []).append(row)
        for rows in rows_alike.values():
            sampler = running[rows[0]][0].request.sampler
            ids[rows] = sampler(logits[rows], [running[row][1].stream for row in rows])
        return ids

    def _deliver(self, ids: np.ndarray) -> None:
        now = time.perf_counter()
        if self.last_step_at is not None:  # every row that was in the last step waited this long for its token
            self.metrics.inter_token_latency.observe(now - self.last_step_at)
        self.last_step_at = now
        events: dict[int, tuple[Job, list]] = {}
        for (job, choice), token in zip(self.rows.payloads, ids):
            if job.cancelled:
                continue
            if job.first_token_at is None:
                job.first_token_at = now
                self.metrics.time_to_first_token.observe(now - job.arrived)
            choice.tokens += 1
            choice.text += self.tokenizer.chars[token]
            piece = self._release(choice, job.request)
            if piece or choice.finish_reason:
                events.setdefault(id(job), (job, []))[1].append((choice.index, piece, choice.finish_reason))
        self.metrics.tokens.inc(len(ids))
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, batch in events.values():
            by_loop.setdefault(job.loop, []).append((job, batch))
        for loop, batches in by_loop.items():  # one wake-up of the event loop a step, not one per request
            loop.call_soon_threadsafe(_hand_out, batches)

    @staticmethod
    def _release(choice: Choice, request: CompletionRequest) -> str:
        """The new text a choice can hand out now; sets its finish reason when it is done."""
        text = choice.text
        for stop in request.stop:
            if text.endswith(stop):  # text grows a character a step: a stop string first shows up at the end
                choice.text, choice.finish_reason = text[:-len(stop)], "stop"
                break
        else:
            if choice.tokens == request.max_tokens:
                choice.finish_reason = "length"
        end = len(choice.text)
        if choice.finish_reason is None:  # hold back what may be the start of a stop string
            end -= max((k for stop in request.stop for k in range(1, len(stop)) if text.endswith(stop[:k])),
                       default=0)
        piece, choice.sent = choice.text[choice.sent:end], max(choice.sent, end)
        return piece

    def _admit(self, logits: np.ndarray) -> np.ndarray:
        """Prefill waiting jobs into free rows, oldest first; their rows' logits join the batch's."""
        jobs, free = [], self.max_batch - self.rows.count
        with self.wake:  # taken off the queue under the lock, prefilled outside it
            while self.waiting and (self.waiting[0].cancelled or len(self.waiting[0].choices) <= free):
                job = self.waiting.popleft()
                if not job.cancelled:
                    jobs.append(job)
                    free -= len(job.choices)
            self.metrics.queue_depth.set(len(self.waiting))
        if not jobs:
            return logits
        # One prefill for every new row, sorted by length so that prompts of one length run as one batch.
        joining = sorted(((job, choice) for job in jobs for choice in job.choices), key=lambda j: len(j[1].prompt))
        new_logits = self.rows.add([choice.prompt for _, choice in joining], payloads=joining)
        return np.concatenate([logits, new_logits]) if len(logits) else new_logits


# ---------------------------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """What /metrics reports, in Prometheus' text format."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        latency = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
        self.requests = Counter("minigpt_requests", "Completion requests by HTTP status", ["status"],
                                registry=self.registry)
        self.tokens = Counter("minigpt_generated_tokens", "Tokens generated", registry=self.registry)
        self.queue_depth = Gauge("minigpt_queue_depth", "Requests waiting for rows", registry=self.registry)
        self.rows_in_use = Gauge("minigpt_rows_in_use", "Rows of the batch holding a sequence", registry=self.registry)
        self.batch_rows = Histogram("minigpt_batch_rows", "Rows in the batch at each step", registry=self.registry,
                                    buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.time_to_first_token = Histogram("minigpt_time_to_first_token_seconds", "From arrival to first token",
                                             buckets=latency, registry=self.registry)
        self.inter_token_latency = Histogram("minigpt_inter_token_latency_seconds",
                                             "Between decode steps: the wait of every row in the batch for its "
                                             "next token",
                                             buckets=latency, registry=self.registry)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---------------------------------------------------------------------------------------------------------------
# The HTTP API


def error_body(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(engine: Engine, tokenizer: CharTokenizer, *, model_id: str, max_batch: int = 32,
               max_queue: int = 256, api_key: str | None = None, max_tokens_limit: int = 4096):
    """The Starlette app; its lifespan starts and stops the scheduler."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    metrics = Metrics()
    scheduler = Scheduler(engine, tokenizer, max_batch, max_queue, metrics)
    created = int(time.time())
    # Unique per server start and request; uuid4 cost 30 µs of the event loop a request.
    completion_ids = (f"{uuid.uuid4().hex[:16]}{number:08x}" for number in itertools.count())

    def fail(error: RequestError) -> JSONResponse:
        metrics.requests.labels(str(error.status)).inc()
        headers = {"Retry-After": "1"} if error.status == 429 else None
        kind = {429: "rate_limit_error", 503: "server_error"}.get(error.status, "invalid_request_error")
        return JSONResponse(error_body(str(error), error.param, error.code, kind), status_code=error.status,
                            headers=headers)

    def check_key(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise RequestError("a valid API key is required: send the header 'Authorization: Bearer KEY'",
                               status=401, code="invalid_api_key")

    async def read_json(request: Request):
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise RequestError(f"the request body is over the {MAX_BODY_BYTES:,}-byte limit")
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(f"the request body is not valid JSON ({exc})") from None

    async def completions(request: Request) -> Response:
        try:
            check_key(request)
            parsed = parse_completion(await read_json(request), tokenizer, model_id=model_id, max_batch=max_batch,
                                      max_tokens_limit=max_tokens_limit)
            job = Job(parsed, asyncio.get_running_loop())
            if not scheduler.submit(job):
                raise RequestError(f"the server is busy ({max_queue} requests are waiting); retry shortly",
                                   status=429, code="queue_full")
        except RequestError as error:
            return fail(error)
        completion_id = f"cmpl-{next(completion_ids)}"
        if parsed.stream:
            return EventStream(sse_events(job, completion_id), on_close=job.cancel)
        try:
            choices = await collect(job, request)
        except RuntimeError as exc:  # the engine failed
            metrics.requests.labels("500").inc()
            return JSONResponse(error_body(str(exc), kind="server_error"), status_code=500)
        finally:
            job.cancel()  # a no-op when it finished; frees its rows when the client went away
        metrics.requests.labels("200").inc()
        return JSONResponse({"id": completion_id, "object": "text_completion", "created": int(time.time()),
                             "model": model_id, "choices": choices, "usage": usage(job)})

    async def collect(job: Job, request: Request) -> list[dict]:
        texts, reasons = [""] * len(job.choices), [None] * len(job.choices)
        while None in reasons:
            try:
                events = await asyncio.wait_for(job.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return []
                continue
            if isinstance(events, Exception):
                raise events
            for index, piece, reason in events:
                texts[index] += piece
                reasons[index] = reason
        return [{"text": text, "index": i, "logprobs": None, "finish_reason": reason}
                for i, (text, reason) in enumerate(zip(texts, reasons))]

    async def sse_events(job: Job, completion_id: str):
        head = "data: " + json.dumps({"id": completion_id, "object": "text_completion", "created": created,
                                      "model": model_id})[:-1] + ', "choices": ['  # each event: head, choices, tail

        def event(events) -> str:
            choices = (f'{{"text": {json.dumps(piece)}, "index": {index}, "logprobs": null, '
                       f'"finish_reason": {json.dumps(reason)}}}' for index, piece, reason in events)
            return head + ", ".join(choices) + "]}\n\n"

        metrics.requests.labels("200").inc()
        unfinished = len(job.choices)
        while unfinished:
            steps = [await job.events.get()]
            while not job.events.empty():  # a client that fell behind gets what piled up in one write
                steps.append(job.events.get_nowait())
            text = []
            for events in steps:
                if isinstance(events, Exception):
                    yield "".join(text) + "data: " + json.dumps(error_body(str(events), kind="server_error")) + "\n\n"
                    return
                text.append(event(events))
                unfinished -= sum(reason is not None for _, _, reason in events)
            yield "".join(text)
        if job.request.include_usage:
            yield head + '], "usage": ' + json.dumps(usage(job)) + "}\n\n"
        yield "data: [DONE]\n\n"

    def usage(job: Job) -> dict:
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
                "total_tokens": job.prompt_tokens + job.completion_tokens}

    async def models(request: Request) -> Response:
        try:
            check_key(request)
        except RequestError as error:
            return fail(error)
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                                         "owned_by": "minigpt"}]})

    async def health(request: Request) -> Response:
        healthy = scheduler.healthy
        return JSONResponse({"status": "ok" if healthy else "engine stopped"}, status_code=200 if healthy else 503)

    async def prometheus(request: Request) -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    class EventStream:
        """Server-sent events written straight to the ASGI connection (a token an event: the fewer layers a
        send passes through, the more clients one event loop keeps up with). However the response ends
        (done, the client gone, the shutdown deadline) its request is cancelled, so its rows are freed at
        the scheduler's next step."""

        def __init__(self, events, on_close):
            self.events, self.on_close = events, on_close

        async def __call__(self, scope, receive, send) -> None:
            watcher = asyncio.ensure_future(self._cancel_on_disconnect(receive, asyncio.current_task()))
            try:
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                async for text in self.events:
                    await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except (OSError, asyncio.CancelledError):  # the client went away, or the shutdown deadline passed
                pass
            finally:
                watcher.cancel()
                self.on_close()

        @staticmethod
        async def _cancel_on_disconnect(receive, stream: asyncio.Task) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            stream.cancel()

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/models", models, methods=["GET"]),
                            Route("/health", health, methods=["GET"]),
                            Route("/metrics", prometheus, methods=["GET"])], lifespan=lifespan)
    app.state.scheduler, app.state.metrics = scheduler, metrics
    return app


def serve(engine: Engine, tokenizer: CharTokenizer, *, model_id: str, host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = 32, max_queue: int = 256, api_key: str | None = None, max_tokens_limit: int = 4096,
          shutdown_timeout: float = 10.0) -> None:
    """Serve until SIGTERM or Ctrl-C: then stop accepting, let requests in flight finish within
    `shutdown_timeout` seconds, cancel the rest, and return."""
    import uvicorn

    app = create_app(engine, tokenizer, model_id=model_id, max_batch=max_batch, max_queue=max_queue,
                     api_key=api_key, max_tokens_limit=max_tokens_limit)
    # No access log: a line per request costs more than a decode step at these sizes.
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout, lifespan="on")
    # uvicorn raises the signal it stopped on again once it is done; the graceful stop was the answer to that
    # signal, so the raised copy meets a handler that does nothing, and `minigpt serve` exits 0.
    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in handled}
    try:
        uvicorn.Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
