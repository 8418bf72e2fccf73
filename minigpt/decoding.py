"""The decoding loop every engine shares, in numpy alone (no torch import).

An engine turns token ids into next-token logits in two steps, as inference
servers do: `prefill` starts sequences from a prompt, `decode` extends every
sequence by one token. The loop here (with its policy past the block size)
and the `Sampler` are the same for every engine, so engines can only differ
in the logits they compute, and they agree token for token.

Past the block size: learned positions stop at block_size, and a cache of
keys computed at positions 0..block_size-1 cannot slide (every key would
need its position changed). So when the context is full, the next step
re-prefills from the most recent `block_size // 2` tokens and decoding
carries on from there: one prefill of half a block every half block, instead
of a full recompute every step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np

from minigpt.errors import MiniGPTError
from minigpt.sampling import Sampler
from minigpt.tokenizer import CharTokenizer

EMPTY_PROMPT = "\n"  # what an empty prompt starts from: the start of a new line


class Engine(Protocol):
    block_size: int

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        """Start new sequences from (B, T) ids, T <= block_size; return (B, V) next-token logits."""

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Append (B,) ids to the sequences; return (B, V) next-token logits."""


def generate_tokens(engine: Engine, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler,
                    num_samples: int = 1) -> Iterator[np.ndarray]:
    """Yield the (num_samples,) ids chosen at each step, all samples decoded as one batch."""
    check_lengths(max_new_tokens, num_samples)
    if max_new_tokens == 0:
        return
    block, keep = engine.block_size, max(1, engine.block_size // 2)
    tokens = np.empty((num_samples, len(prompt_ids) + max_new_tokens), dtype=np.int64)
    tokens[:, :len(prompt_ids)] = prompt_ids
    length = len(prompt_ids)
    context = min(length, block)  # a long prompt is read through its last block_size tokens
    logits = engine.prefill(tokens[:, length - context:length])
    for step in range(max_new_tokens):
        next_ids = sampler(logits)
        tokens[:, length] = next_ids
        length += 1
        yield next_ids
        if step + 1 == max_new_tokens:
            break
        if context == block:  # full: restart from the most recent tokens (see the module's docstring)
            context = keep
            logits = engine.prefill(tokens[:, length - keep:length])
        else:
            context += 1
            logits = engine.decode(next_ids)


def check_lengths(max_new_tokens: int, num_samples: int) -> None:
    if max_new_tokens < 0:
        raise MiniGPTError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_samples < 1:
        raise MiniGPTError(f"num_samples must be >= 1, got {num_samples}")


def prompt_ids(tokenizer: CharTokenizer, prompt: str) -> list[int]:
    """Encode a prompt; an empty one starts from a newline."""
    if not prompt:
        if EMPTY_PROMPT not in tokenizer.chars:
            raise MiniGPTError("the prompt is empty and the vocabulary has no newline to start from; "
                               "give a prompt with --prompt")
        prompt = EMPTY_PROMPT
    return tokenizer.encode(prompt)


def stream_characters(engine: Engine, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int, *,
                      num_samples: int = 1, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, seed: int | None = None) -> Iterator[list[str]]:
    """Yield, at each step, the next character of each of `num_samples` samples.

    Bad arguments raise here, before the first step is asked for.
    """
    sampler = Sampler(temperature, top_k, top_p, seed)
    ids = prompt_ids(tokenizer, prompt)
    check_lengths(max_new_tokens, num_samples)
    steps = generate_tokens(engine, ids, max_new_tokens, sampler, num_samples)
    return ([tokenizer.chars[i] for i in next_ids] for next_ids in steps)


def join_samples(prompt: str, steps: Iterator[list[str]], num_samples: int) -> list[str]:
    """Collect per-step characters into `num_samples` whole texts, each starting with the prompt."""
    columns = list(steps)
    return [prompt + "".join(sample) for sample in zip(*columns)] if columns else [prompt] * num_samples
