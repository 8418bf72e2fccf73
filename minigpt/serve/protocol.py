"""The request protocol of `minigpt serve`: OpenAI's /v1/completions bodies in, response shapes out.

Pure functions and plain data: nothing here touches the engine, a thread or
a socket, so every rule of the API can be read (and tested) on its own.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import numpy as np

from minigpt.text import EMPTY_PROMPT, prompt_ids
from minigpt.errors import ConfigError, MiniGPTError
from minigpt.controls import BIAS, make_sampler
from minigpt.fast_sampling import FastSampler
from minigpt.serve.limits import Limits
from minigpt.sampling import Sampler
from minigpt.tokenizer import CharTokenizer

MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_STOP_LENGTH = 4096  # characters: a stop string's matcher is built when the request arrives
MAX_TEMPERATURE = 2  # likewise
MAX_LOGPROBS = 5  # likewise
MAX_SCORED_TOKENS = 8192  # an echoed prompt is scored on the scheduler's thread: a bound on how long that takes
UNSUPPORTED = {"suffix": None, "best_of": None}  # fields accepted only at their neutral value
PATTERNS = ("guided_regex", "guided_choice", "guided_json", "response_format")  # vLLM's names, OpenAI's last


class RequestError(Exception):
    """A bad request: answered with `status` and OpenAI's error body naming `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    @property
    def kind(self) -> str:
        return {429: "rate_limit_error", 500: "server_error", 503: "server_error"}.get(self.status,
                                                                                      "invalid_request_error")


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
    logprobs: int | None = None  # how many likeliest tokens to list at each position; None: no log-probabilities
    echo: bool = False  # the prompt comes back before the completion, with its own log-probabilities

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompt_ids)


def _typed(body: dict, name: str, kinds: tuple, default, what: str):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise RequestError(f"{name} must be {what}, got {json.dumps(value)[:40]}", name)
    return value


def parse_completion(body, tokenizer: CharTokenizer, model_id: str, limits: Limits,
                     patterns: dict | None = None) -> CompletionRequest:
    """Check a request body field by field; the first problem raises RequestError naming its field. A pattern
    the body asks for is compiled here (`patterns`: compiled ones by their source, kept between requests)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _check_model(body, model_id)
    prompts, ids = _parse_prompts(body, tokenizer)
    max_tokens = _typed(body, "max_tokens", (int,), 16, "an integer")
    if not 0 <= max_tokens <= limits.max_tokens:
        raise RequestError(f"max_tokens must be from 0 to {limits.max_tokens} (0 with echo scores the prompt "
                           f"alone), got {max_tokens}", "max_tokens")
    n = _typed(body, "n", (int,), 1, "an integer")
    if not 1 <= n <= limits.max_batch or n * len(prompts) > limits.max_batch:
        raise RequestError(f"n × prompts must be from 1 to {limits.max_batch} (this server's --max-batch), got "
                           f"{n} × {len(prompts)}", "n")
    stop = _parse_stop(body)
    stream = _typed(body, "stream", (bool,), False, "true or false")
    options = _typed(body, "stream_options", (dict,), {}, "an object")
    for name, neutral in UNSUPPORTED.items():
        if body.get(name, neutral) not in (neutral, None) and not (name == "best_of" and body[name] == n):
            raise RequestError(f"{name} is not supported by this server; leave it out", name)
    logprobs, echo = _parse_logprobs(body, ids)
    return CompletionRequest(prompts, ids, max_tokens, n, stop, stream, bool(options.get("include_usage")),
                             _parse_sampler(body, tokenizer, patterns), logprobs, echo)


def parse_prompt(body, tokenizer: CharTokenizer, model_id: str) -> list[int]:
    """One prompt, as /v1/completions takes it (the body of /v1/attention)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _check_model(body, model_id)
    _, ids = _parse_prompts(body, tokenizer)
    if len(ids) != 1:
        raise RequestError("give one prompt: a string or a list of token ids", "prompt")
    return ids[0]


def _check_model(body: dict, model_id: str) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError(f"model is required: the model served here is {model_id!r}", "model")
    check_model_name(model, model_id)


def check_model_name(model: str, model_id: str) -> None:
    """A model named in a body or a path (GET /v1/models/{id}) must be the one served: else 404."""
    if model != model_id:
        raise RequestError(f"the model {model!r} does not exist; this server serves {model_id!r}", "model", 404,
                           "model_not_found")


def _parse_prompts(body: dict, tokenizer: CharTokenizer) -> tuple[list[str], list[list[int]]]:
    """Prompts as OpenAI takes them: a string, a list of strings, token ids, or a list of lists of token ids."""
    prompt = body.get("prompt", "")
    if isinstance(prompt, str) or _is_ids(prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not (all(isinstance(p, str) for p in prompt)
                                                          or all(_is_ids(p) for p in prompt)):
        raise RequestError("prompt must be a string, a non-empty list of strings, a list of token ids or a list of "
                           "such lists", "prompt")
    if isinstance(prompt[0], str):
        try:
            return prompt, [prompt_ids(tokenizer, p) for p in prompt]
        except MiniGPTError as exc:  # unknown characters: the CLI's message
            raise RequestError(str(exc), "prompt") from None
    vocab = tokenizer.vocab_size
    for ids in prompt:
        if not ids or not in_vocabulary(ids, vocab):
            raise RequestError(f"token ids must be from 0 to {vocab - 1} (this model's vocabulary), at least one a "
                               "prompt", "prompt")
    return [tokenizer.decode(ids) for ids in prompt], prompt


def _is_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


def in_vocabulary(value, vocab_size: int) -> bool:
    """A list of token ids, each one the model has (prompts, /detokenize)."""
    return _is_ids(value) and all(0 <= i < vocab_size for i in value)


def _parse_logprobs(body: dict, ids: list[list[int]]) -> tuple[int | None, bool]:
    logprobs = _typed(body, "logprobs", (int,), None, "an integer")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise RequestError(f"logprobs must be from 0 to {MAX_LOGPROBS}, as in OpenAI's API; got {logprobs}",
                           "logprobs")
    echo = _typed(body, "echo", (bool,), False, "true or false")
    if echo and max(map(len, ids)) > MAX_SCORED_TOKENS:
        raise RequestError(f"an echoed prompt can have at most {MAX_SCORED_TOKENS:,} tokens (each is scored), got "
                           f"{max(map(len, ids)):,}; split the text", "prompt")
    return logprobs, echo


def _parse_stop(body: dict) -> list[str]:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in stop)):
        raise RequestError(f"stop must be a string of 1 to {MAX_STOP_LENGTH:,} characters or a list of up to "
                           f"{MAX_STOP_STRINGS} of them", "stop")
    return stop


def _parse_sampler(body: dict, tokenizer, patterns: dict | None) -> Sampler:
    number = (int, float)
    sampling = {"temperature": _typed(body, "temperature", number, 1.0, "a number"),
                "top_k": _typed(body, "top_k", (int,), None, "an integer"),
                "top_p": _typed(body, "top_p", number, None, "a number"),
                "min_p": _typed(body, "min_p", number, None, "a number"),
                "seed": _typed(body, "seed", (int,), None, "an integer"),
                "repetition_penalty": _typed(body, "repetition_penalty", number, 1.0, "a number"),
                "presence_penalty": _typed(body, "presence_penalty", number, 0.0, "a number"),
                "frequency_penalty": _typed(body, "frequency_penalty", number, 0.0, "a number"),
                "logit_bias": _parse_logit_bias(body, tokenizer.vocab_size)}
    temperature = sampling["temperature"]
    # OpenAI's range, checked before anything turns the number into a float: an integer of 2**1024 or more, or
    # Infinity, would otherwise reach the sampler.
    if temperature > MAX_TEMPERATURE or isinstance(temperature, float) and not math.isfinite(temperature):
        raise RequestError(f"temperature must be a number from 0 to {MAX_TEMPERATURE} (0 is greedy), as in "
                           f"OpenAI's API; got {json.dumps(temperature)[:40]}", "temperature")
    field, pattern = _parse_pattern(body)
    try:
        return make_sampler(tokenizer, FastSampler, **sampling, **pattern, cache=patterns)
    except ConfigError as exc:  # the CLI's checks and messages, naming the field at fault
        raise RequestError(str(exc), field if exc.field in PATTERN_KINDS else exc.field) from None


PATTERN_KINDS = ("regex", "choices", "json_schema")


def _parse_pattern(body: dict) -> tuple[str | None, dict]:
    """The one pattern field a body gives, and what `make_sampler` takes for it."""
    given = [name for name in PATTERNS if body.get(name) is not None]
    if given == ["response_format"]:
        form = body["response_format"]
        kind = form.get("type") if isinstance(form, dict) else None
        if kind == "text":
            return None, {}
        schema = form.get("json_schema") if kind == "json_schema" else None
        if not isinstance(schema, dict) or not isinstance(schema.get("schema"), dict):
            raise RequestError('response_format must be {"type": "text"} or {"type": "json_schema", "json_schema": '
                               '{"name": ..., "schema": {...}}}', "response_format")
        return "response_format", {"json_schema": schema["schema"]}
    if len(given) > 1:
        raise RequestError(f"give one of {', '.join(PATTERNS)}, not {' and '.join(given)}", given[1])
    if not given:
        return None, {}
    name, value = given[0], body[given[0]]
    kind = {"guided_regex": "regex", "guided_choice": "choices", "guided_json": "json_schema"}[name]
    if name == "guided_regex" and not isinstance(value, str) or name == "guided_json" and not isinstance(
            value, (str, dict)):
        raise RequestError(f"{name} must be {'a string' if name == 'guided_regex' else 'a JSON schema'}", name)
    return name, {kind: value}


def asks_for_pattern(body) -> bool:
    return isinstance(body, dict) and any(body.get(name) is not None for name in PATTERNS)


def _parse_logit_bias(body: dict, vocab_size: int) -> dict[int, float]:
    """OpenAI's logit_bias: token ids (as the JSON object's keys) to a bias from -100 to 100."""
    bias = _typed(body, "logit_bias", (dict,), {}, "an object of token ids to numbers")
    parsed = {}
    for key, value in bias.items():
        token = int(key) if key.isdigit() and len(key) < 10 else -1
        if not 0 <= token < vocab_size:
            raise RequestError(f"logit_bias keys must be token ids from 0 to {vocab_size - 1} (this model's "
                               f"vocabulary), got {json.dumps(key)[:40]}", "logit_bias")
        if not BIAS.holds(value):
            raise RequestError(f"logit_bias values must be numbers from -100 to 100, got {json.dumps(value)[:40]} "
                               f"for token {token}", "logit_bias")
        parsed[token] = float(value)
    return parsed


def lm_eval_model_args(model_id: str, base_url: str, tokenizer: CharTokenizer, block_size: int) -> str:
    """lm-eval's `--model_args` for `--model local-completions` against this server (its tokenizer comes from
    /tokenize on its own). A character vocabulary has no special token to begin a text with: the newline an
    empty prompt starts from is named instead. max_length - 2 a multiple of the block makes lm-eval's rolling
    windows `minigpt eval`'s own (each request is scored in whole blocks from its context token on)."""
    max_length = -(-2048 // block_size) * block_size + 2
    args = f"model={model_id},base_url={base_url}/completions,max_length={max_length}"
    if EMPTY_PROMPT in tokenizer:
        args += f",custom_prefix_token_id={tokenizer.id_of(EMPTY_PROMPT)}"
    return args


# ---------------------------------------------------------------------------------------------------------------
# Responses


def top_tokens(logprobs: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The `top` likeliest ids of each row of (..., V) log-probabilities and theirs, likeliest first."""
    if top == 0:
        return (np.zeros(logprobs.shape[:-1] + (0,), dtype=np.int64),
                np.zeros(logprobs.shape[:-1] + (0,), dtype=np.float64))
    ids = np.argpartition(-logprobs, top - 1, axis=-1)[..., :top] if top < logprobs.shape[-1] else \
        np.broadcast_to(np.arange(logprobs.shape[-1]), logprobs.shape)
    chosen = np.take_along_axis(logprobs, ids, axis=-1)
    order = np.argsort(-chosen, axis=-1, kind="stable")  # a partition is unordered: sort the few it keeps
    return np.take_along_axis(ids, order, axis=-1), np.take_along_axis(chosen, order, axis=-1)


@dataclass
class Scores:
    """The log-probabilities of a run of tokens, as OpenAI's legacy completions list them: an echoed prompt's
    first token has none."""

    offsets: list[int]  # where each token's text starts in the prompt + completion text, in characters
    tokens: list[str]
    entries: list[tuple[float | None, dict[str, float] | None]]  # (logprob, the likeliest tokens' logprobs)

    def __add__(self, later: Scores) -> Scores:
        return Scores(self.offsets + later.offsets, self.tokens + later.tokens, self.entries + later.entries)

    def as_json(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": [logprob for logprob, _ in self.entries],
                "top_logprobs": [top for _, top in self.entries],
                "text_offset": self.offsets}

    def json_text(self) -> str:
        """json.dumps(self.as_json()), formatted by hand: a streamed token's scores, written at every step,
        cost 3x its text through json.dumps."""
        if len(self.tokens) == 1 and self.entries[0][1] is not None:  # a streamed step's token
            (logprob, top), = self.entries
            return (f'{{"tokens": [{_quoted(self.tokens[0])}], "token_logprobs": [{logprob!r}], "top_logprobs": '
                    f'[{{{", ".join([f"{_quoted(t)}: {v!r}" for t, v in top.items()])}}}], '
                    f'"text_offset": [{self.offsets[0]}]}}')
        tops = ("null" if top is None else "{" + ", ".join(f"{_quoted(t)}: {v!r}" for t, v in top.items()) + "}"
                for _, top in self.entries)
        return (f'{{"tokens": [{", ".join(map(_quoted, self.tokens))}], "token_logprobs": ['
                f'{", ".join("null" if logprob is None else repr(logprob) for logprob, _ in self.entries)}], '
                f'"top_logprobs": [{", ".join(tops)}], '
                f'"text_offset": [{", ".join(map(str, self.offsets))}]}}')


_quoted = functools.lru_cache(maxsize=4096)(json.dumps)  # a token's text as a JSON string


def error_body(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(completion_id: str, created: int, model_id: str, texts: list[str], reasons: list[str],
                    scores: list[Scores | None], token_usage: dict) -> dict:
    choices = [{"text": text, "index": i, "logprobs": None if run is None else run.as_json(), "finish_reason": reason}
               for i, (text, reason, run) in enumerate(zip(texts, reasons, scores))]
    return {"id": completion_id, "object": "text_completion", "created": created, "model": model_id,
            "choices": choices, "usage": token_usage}


class ChunkFormat:
    """Server-sent events of a streamed completion: a fixed head, then each step's choices (formatted by hand:
    json.dumps of the whole chunk for every token costs more than the decode step)."""

    def __init__(self, completion_id: str, created: int, model_id: str):
        self.head = "data: " + json.dumps({"id": completion_id, "object": "text_completion", "created": created,
                                           "model": model_id})[:-1] + ', "choices": ['

    def choices(self, events: list[tuple[int, str, str | None, Scores | None]]) -> str:
        """One chunk of (index, text, finish_reason, scores) events."""
        choices = (f'{{"text": {json.dumps(piece)}, "index": {index}, '
                   f'"logprobs": {"null" if run is None else run.json_text()}, '
                   f'"finish_reason": {json.dumps(reason)}}}' for index, piece, reason, run in events)
        return self.head + ", ".join(choices) + "]}\n\n"

    def usage(self, token_usage: dict) -> str:
        return self.head + '], "usage": ' + json.dumps(token_usage) + "}\n\n"

    @staticmethod
    def error(message: str) -> str:
        return "data: " + json.dumps(error_body(message, kind="server_error")) + "\n\n"

    DONE = "data: [DONE]\n\n"
