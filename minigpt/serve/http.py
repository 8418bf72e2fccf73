"""The HTTP layer of `minigpt serve`: routes, the JSON and event-stream responses, uvicorn.

Starlette on uvicorn: Starlette is the ASGI toolkit FastAPI is built on, and
this API is a few routes whose validation must answer in OpenAI's error
shape with the CLI's own messages, which FastAPI's pydantic layer would have
to be worked around for; uvicorn brings the graceful shutdown (stop
accepting, finish in-flight requests within a deadline, then cancel them).
Nothing here imports torch: with an ONNX model the server runs on
onnxruntime and numpy alone.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import signal
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from minigpt.decoding import Engine
from minigpt.errors import MiniGPTError
from minigpt.serve.connections import guarded_protocol
from minigpt.serve.metrics import Metrics
from minigpt.serve.protocol import ChunkFormat, Limits, RequestError, Scores, check_model_name, completion_body, \
    asks_for_pattern, error_body, in_vocabulary, parse_completion, parse_prompt, usage
from minigpt.serve.scheduler import Job, Scheduler
from minigpt.tokenizer import CharTokenizer

MAX_BODY_BYTES = 1 << 20
MAX_HEAD_BYTES = 64 << 10  # the request line and headers; nginx's default is 32 KiB
LOG = logging.getLogger("uvicorn.error")  # where uvicorn writes its own lines
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


class CompletionsAPI:
    """The route handlers, over one scheduler."""

    def __init__(self, scheduler: Scheduler, metrics: Metrics, tokenizer: CharTokenizer, *, model_id: str,
                 limits: Limits, api_key: str | None):
        self.scheduler, self.metrics, self.tokenizer = scheduler, metrics, tokenizer
        self.model_id, self.limits, self.api_key = model_id, limits, api_key
        self.block_size = scheduler.rows.engine.block_size
        self.created = int(time.time())
        self.patterns: dict = {}  # compiled patterns by their source (`minigpt.patterns`)
        # Unique per server start and request; one uuid4 a start, not one a request (it costs the event loop).
        self.completion_ids = (f"cmpl-{uuid.uuid4().hex[:16]}{number:08x}" for number in itertools.count())

    def fail(self, error: RequestError):
        from starlette.responses import JSONResponse

        self.metrics.answered(error.status)
        headers = {"Retry-After": "1"} if error.status == 429 else None
        return JSONResponse(error_body(str(error), error.param, error.code, error.kind), status_code=error.status,
                            headers=headers)

    def check_key(self, request) -> None:
        if self.api_key is not None and request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise RequestError("a valid API key is required: send the header 'Authorization: Bearer KEY'",
                               status=401, code="invalid_api_key")

    async def completions(self, request):
        from starlette.responses import JSONResponse

        try:
            self.check_key(request)
            body = await read_json(request, self.limits.read_timeout)
            parse = functools.partial(parse_completion, body, self.tokenizer, self.model_id, self.limits,
                                      self.patterns)
            # A pattern compiles in a worker thread: a long one must not hold up the other requests.
            parsed = await asyncio.to_thread(parse) if asks_for_pattern(body) else parse()
            job = Job(parsed, asyncio.get_running_loop(), self.tokenizer)
            if not self.scheduler.submit(job):
                raise RequestError(f"the server is busy ({self.limits.max_queue} requests are waiting); retry shortly",
                                   status=429, code="queue_full")
        except RequestError as error:
            return self.fail(error)
        completion_id, created = next(self.completion_ids), int(time.time())
        if parsed.stream:
            self.metrics.answered(200)
            return EventStream(stream_events(job, ChunkFormat(completion_id, created, self.model_id)),
                               on_close=job.cancel)
        try:
            texts, reasons, scores = await collect(job, request)
        except RuntimeError as exc:  # the engine failed
            return self.fail(RequestError(str(exc), status=500))
        finally:
            job.cancel()  # a no-op when it finished; frees its rows when the client went away
        self.metrics.answered(200)
        return JSONResponse(completion_body(completion_id, created, self.model_id, texts, reasons, scores,
                                            job_usage(job)))

    async def chat(self, request):
        return self.fail(RequestError(f"{self.model_id!r} is a completion model: it continues text and has no chat "
                                      "template; send a prompt to /v1/completions", status=404,
                                      code="model_not_chat"))

    async def not_found(self, request, exc):
        return self.fail(RequestError(f"no route {request.url.path}; this server has POST /v1/completions, GET "
                                      "/v1/models, /health, /metrics and the playground at /", status=404,
                                      code="not_found"))

    async def not_allowed(self, request, exc):
        return self.fail(RequestError(f"{request.method} is not allowed on {request.url.path}", status=405,
                                      code="method_not_allowed"))

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "minigpt",
                "max_model_len": self.block_size}  # vLLM's field: the context the model reads at once

    async def models(self, request):
        from starlette.responses import JSONResponse

        try:
            self.check_key(request)
        except RequestError as error:
            return self.fail(error)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request):
        from starlette.responses import JSONResponse

        try:
            self.check_key(request)
            check_model_name(request.path_params["model"], self.model_id)
        except RequestError as error:
            return self.fail(error)
        return JSONResponse(self.model_card())

    async def tokenizer_info(self, request):
        """vLLM's tokenizer routes, which lm-eval's `local-completions` finds and uses on its own: neither a
        character vocabulary nor minigpt's byte-level BPE has special tokens."""
        from starlette.responses import JSONResponse

        return JSONResponse({"tokenizer_class": type(self.tokenizer).__name__, "vocab_size": self.tokenizer.vocab_size,
                             "model_max_length": self.block_size, "bos_token": None, "eos_token": None,
                             "pad_token": None, "unk_token": None, "chat_template": None})

    async def tokenize(self, request):
        from starlette.responses import JSONResponse

        try:
            body = await read_json(request, self.limits.read_timeout)
            text = body.get("prompt") if isinstance(body, dict) else None
            if not isinstance(text, str):
                raise RequestError("send {\"prompt\": TEXT}", "prompt")
            ids = self.tokenizer.encode(text)
        except MiniGPTError as exc:  # unknown characters: the CLI's message
            return self.fail(RequestError(str(exc), "prompt"))
        except RequestError as error:
            return self.fail(error)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.block_size})

    async def detokenize(self, request):
        from starlette.responses import JSONResponse

        try:
            body = await read_json(request, self.limits.read_timeout)
            ids = body.get("tokens") if isinstance(body, dict) else None
            if not in_vocabulary(ids, self.tokenizer.vocab_size):
                raise RequestError(f"send {{\"tokens\": [ids from 0 to {self.tokenizer.vocab_size - 1}]}}", "tokens")
        except RequestError as error:
            return self.fail(error)
        return JSONResponse({"prompt": self.tokenizer.decode(ids)})

    async def attention(self, request):
        """What the model attended to as it wrote the character after `prompt`: the last position's weights in
        every layer and head over the characters it reads (the last block_size), from the model's own forward
        pass, as `minigpt attention` draws them; run on the scheduler's thread, between steps."""
        from starlette.responses import JSONResponse

        try:
            self.check_key(request)
            ids = parse_prompt(await read_json(request, self.limits.read_timeout), self.tokenizer, self.model_id)
            model = getattr(self.scheduler.rows.engine, "model", None)
            if not hasattr(model, "blocks"):  # an .onnx graph: no PyTorch model
                raise RequestError("attention weights need the PyTorch engine: serve a .safetensors checkpoint "
                                   "(an .onnx graph fuses attention and keeps no weights)", status=501,
                                   code="attention_unavailable")
            window = ids[-self.block_size:]
            weights = await asyncio.wrap_future(self.scheduler.call(lambda: last_attention(model, window)))
        except RequestError as error:
            return self.fail(error)
        return JSONResponse({"tokens": [self.scheduler.names[i] for i in window], "weights": weights})

    async def page(self, request):
        """The playground (`minigpt/serve/playground/`): static files, read once."""
        from starlette.responses import Response

        name = request.url.path.strip("/") or "index.html"
        return Response(playground_file(name), media_type=PAGE_TYPES[name.rsplit(".", 1)[1]])

    async def health(self, request):
        from starlette.responses import JSONResponse

        healthy = self.scheduler.healthy
        return JSONResponse({"status": "ok" if healthy else "engine stopped"}, status_code=200 if healthy else 503)

    async def prometheus(self, request):
        from starlette.responses import Response

        return Response(self.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def read_json(request, timeout: float):
    """The body as JSON; what goes wrong is a RequestError: too big, too slow (408), not JSON, the client gone."""
    from starlette.requests import ClientDisconnect

    try:
        body = await asyncio.wait_for(_read_body(request), timeout)
    except asyncio.TimeoutError:
        raise RequestError(f"the request body did not arrive within {timeout:g} s", status=408,
                           code="read_timeout") from None
    except ClientDisconnect:  # one line in the log, not a traceback
        LOG.info("minigpt: a client went away while sending its request body")
        raise RequestError("the client went away while sending its body", code="client_disconnected") from None
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, an integer of over 4,300 digits, deep nesting
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise RequestError(f"the request body is not valid JSON ({reason})") from None


async def _read_body(request) -> bytearray:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise RequestError(f"the request body is over the {MAX_BODY_BYTES:,}-byte limit")
    return body


def last_attention(model, ids: list[int]) -> list:
    """(layers, heads, T) weights of the last of `ids` over all of them, as nested lists."""
    import torch

    from minigpt.attention_maps import attention_maps

    with torch.inference_mode():
        maps = attention_maps(model, torch.tensor([ids], device=next(model.parameters()).device))
    return maps[:, 0, :, -1].double().cpu().numpy().round(6).tolist()


PLAYGROUND = Path(__file__).parent / "playground"  # shipped in the package: nothing is fetched from elsewhere
PAGE_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
              "css": "text/css; charset=utf-8", "svg": "image/svg+xml"}


@functools.cache
def playground_file(name: str) -> bytes:
    return (PLAYGROUND / name).read_bytes()


def job_usage(job: Job) -> dict:
    return usage(job.request.prompt_tokens, job.completion_tokens)


async def collect(job: Job, request) -> tuple[list[str], list[str], list[Scores | None]]:
    """A whole completion's texts, finish reasons and scores (all empty when the client went away)."""
    count = len(job.choices)
    texts, reasons, scores = [""] * count, [None] * count, [None] * count
    while None in reasons:
        try:
            events = await asyncio.wait_for(job.events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return [], [], []
            continue
        if isinstance(events, Exception):
            raise events
        for index, piece, reason, run in events:
            texts[index] += piece
            reasons[index] = reason
            if run is not None:
                scores[index] = run if scores[index] is None else scores[index] + run
    return texts, reasons, scores


async def stream_events(job: Job, chunks: ChunkFormat):
    """The text of a streamed completion's server-sent events, a step's worth (or more) at a time."""
    unfinished = len(job.choices)
    while unfinished:
        steps = [await job.events.get()]
        while not job.events.empty():  # a client that fell behind gets what piled up in one write
            steps.append(job.events.get_nowait())
        text = []
        for events in steps:
            if isinstance(events, Exception):
                yield "".join(text) + chunks.error(str(events))
                return
            text.append(chunks.choices(events))
            unfinished -= sum(reason is not None for _, _, reason, _ in events)
        yield "".join(text)
    if job.request.include_usage:
        yield chunks.usage(job_usage(job))
    yield chunks.DONE


class EventStream:
    """Server-sent events written straight to the ASGI connection (a token an event: the fewer layers a send
    passes through, the more clients one event loop keeps up with). However the response ends (done, the
    client gone, the shutdown deadline) its request is cancelled, so its rows are freed at the scheduler's
    next step."""

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


def create_app(engine: Engine, tokenizer: CharTokenizer, *, model_id: str, limits: Limits | None = None,
               api_key: str | None = None, step=None):
    """The Starlette app; its lifespan starts and stops the scheduler. `step` (a `minigpt.decoding.Step`;
    `minigpt.speculative.make_step` speculates) finds each step's tokens."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    limits = limits or Limits()
    metrics = Metrics()
    scheduler = Scheduler(engine, tokenizer, limits.max_batch, limits.max_queue, metrics, step)
    api = CompletionsAPI(scheduler, metrics, tokenizer, model_id=model_id, limits=limits, api_key=api_key)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = Starlette(routes=[Route("/v1/completions", api.completions, methods=["POST"]),
                            Route("/v1/chat/completions", api.chat, methods=["POST"]),
                            Route("/v1/models", api.models, methods=["GET"]),
                            Route("/v1/models/{model:path}", api.model, methods=["GET"]),
                            Route("/tokenizer_info", api.tokenizer_info, methods=["GET"]),
                            Route("/tokenize", api.tokenize, methods=["POST"]),
                            Route("/detokenize", api.detokenize, methods=["POST"]),
                            Route("/v1/attention", api.attention, methods=["POST"]),
                            Route("/", api.page, methods=["GET"]),
                            Route("/playground.js", api.page, methods=["GET"]),
                            Route("/playground.css", api.page, methods=["GET"]),
                            Route("/favicon.svg", api.page, methods=["GET"]),
                            Route("/health", api.health, methods=["GET"]),
                            Route("/metrics", api.prometheus, methods=["GET"])], lifespan=lifespan,
                    exception_handlers={404: api.not_found, 405: api.not_allowed})
    app.state.scheduler, app.state.metrics = scheduler, metrics
    return app


def serve(engine: Engine, tokenizer: CharTokenizer, *, model_id: str, host: str = "127.0.0.1", port: int = 8000,
          limits: Limits | None = None, api_key: str | None = None, shutdown_timeout: float = 10.0,
          step=None) -> None:
    """Serve until SIGTERM or Ctrl-C: then stop accepting, let requests in flight finish within
    `shutdown_timeout` seconds, cancel the rest, and return."""
    import uvicorn

    limits = limits or Limits()
    app = create_app(engine, tokenizer, model_id=model_id, limits=limits, api_key=api_key, step=step)
    protocol = guarded_protocol(limits.read_timeout, MAX_HEAD_BYTES, limits.max_connections,
                                app.state.metrics.answered)
    # No access log: a line per request costs more than a decode step at these sizes.
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False, http=protocol,
                            timeout_keep_alive=5, timeout_graceful_shutdown=shutdown_timeout, lifespan="on")
    # uvicorn raises the signal it stopped on again once it is done; the graceful stop was the answer to that
    # signal, so the raised copy is ignored, and `minigpt serve` exits 0.
    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in handled}
    try:
        uvicorn.Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
