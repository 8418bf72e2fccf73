"""Text in, text out: a prompt to ids, and the characters of each step back (numpy only, as the loop)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from minigpt.decoding import Engine, Step, generate_rows
from minigpt.engine_checks import check_lengths
from minigpt.errors import MiniGPTError
from minigpt.sampling import Sampler
from minigpt.tokenizer import CharTokenizer

EMPTY_PROMPT = "\n"  # what an empty prompt starts from: the start of a new line


def prompt_ids(tokenizer: CharTokenizer, prompt: str) -> list[int]:
    """Encode a prompt; an empty one starts from a newline."""
    if not prompt:
        if EMPTY_PROMPT not in tokenizer:
            raise MiniGPTError("the prompt is empty and the vocabulary has no newline to start from; "
                               "give a prompt with --prompt")
        prompt = EMPTY_PROMPT
    return tokenizer.encode(prompt)


def stream_characters(engine: Engine, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int, *,
                      num_samples: int = 1, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, seed: int | None = None, step: Step | None = None,
                      sampler_type: type[Sampler] = Sampler) -> Iterator[list[str]]:
    """Yield, at each step, the text each of `num_samples` samples' next token completes: its character, or ""
    while a subword's character is still arriving (bad arguments raise here, before the first step)."""
    sampler = sampler_type(temperature, top_k, top_p, seed)
    ids = prompt_ids(tokenizer, prompt)
    check_lengths(max_new_tokens, num_samples)
    steps = generate_rows(engine, [ids] * num_samples, max_new_tokens, sampler, step)
    return _texts(steps, [tokenizer.pieces() for _ in range(num_samples)])


def _texts(steps: Iterator[np.ndarray], pieces: list) -> Iterator[list[str]]:
    for next_ids in steps:
        yield [piece(i) for piece, i in zip(pieces, next_ids.tolist())]
    if any(rest := [piece(None) for piece in pieces]):  # a character cut off by the last token
        yield rest


def join_samples(prompt: str, steps: Iterator[list[str]], num_samples: int) -> list[str]:
    """Collect per-step characters into `num_samples` whole texts, each starting with the prompt."""
    columns = list(steps)
    return [prompt + "".join(sample) for sample in zip(*columns)] if columns else [prompt] * num_samples
