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
                      num_samples: int = 1, step: Step | None = None, sampler_type: type[Sampler] = Sampler,
                      by_step: bool = False, **sampling) -> Iterator[list]:
    """Yield, at each position, the text each of `num_samples` samples' next token completes: its character,
    or "" while a subword's character is still arriving, or once a sample's pattern is complete (bad arguments
    raise here, before the first step). by_step: yield a list of those a step (a speculative step finds several
    positions at once), so that a stream is written once a step. `sampling`: temperature, top_k, top_p, min_p,
    seed and the controls of `minigpt.controls.make_sampler`."""
    from minigpt.controls import make_sampler

    sampler = make_sampler(tokenizer, sampler_type, **sampling)
    ids = prompt_ids(tokenizer, prompt)
    check_lengths(max_new_tokens, num_samples)
    steps = generate_rows(engine, [ids] * num_samples, max_new_tokens, sampler, step, by_step=True)
    texts = _texts(steps, [tokenizer.pieces() for _ in range(num_samples)], getattr(sampler, "pattern", None))
    return texts if by_step else (position for found in texts for position in found)


def _texts(steps: Iterator[np.ndarray], pieces: list, pattern) -> Iterator[list[list[str]]]:
    """For each step's (samples, n) ids, the text of each of its n positions for each sample."""
    states = [None if pattern is None else pattern.start] * len(pieces)
    whole = [False] * len(pieces)  # a sample whose pattern allows nothing more: what its row picks is not its text
    for block in steps:
        found = []
        for next_ids in block.T.tolist():
            found.append(["" if done else piece(token) for piece, token, done in zip(pieces, next_ids, whole)])
            if pattern is not None:
                states = [pattern.next(state, token) for state, token in zip(states, next_ids)]
                whole = [done or pattern.complete(state) for done, state in zip(whole, states)]
                if all(whole):
                    yield found
                    return
        yield found
    if any(rest := [piece(None) for piece in pieces]):  # a character cut off by the last token
        yield [rest]


def join_samples(prompt: str, steps: Iterator[list[str]], num_samples: int) -> list[str]:
    """Collect per-step characters into `num_samples` whole texts, each starting with the prompt."""
    columns = list(steps)
    return [prompt + "".join(sample) for sample in zip(*columns)] if columns else [prompt] * num_samples
