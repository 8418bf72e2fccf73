"""Autoregressive generation, shared by every engine.

An engine turns token ids into last-position logits in two steps, as
inference servers do: `prefill` reads the prompt, `decode` extends every
sequence by one token. The loop below and the `Sampler` are the same for all
engines, so engines can only differ in the logits they compute.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from minigpt.errors import MiniGPTError
from minigpt.model import MiniGPT
from minigpt.sampling import Sampler
from minigpt.tokenizer import CharTokenizer

EMPTY_PROMPT = "\n"  # what an empty prompt starts from: the start of a new line


class Engine(Protocol):
    def prefill(self, ids: np.ndarray) -> np.ndarray:
        """Start new sequences from (B, T) prompt ids; return (B, V) logits for the next token."""

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Append (B,) ids to the sequences; return (B, V) logits for the next token."""


class RecomputeEngine:
    """The reference engine: every step runs the model over the whole context again.

    Past block_size the context is cropped to the last block_size tokens.
    """

    def __init__(self, model: MiniGPT):
        self.model = model
        self.device = next(model.parameters()).device
        self.context: torch.Tensor | None = None

    @torch.inference_mode()
    def _logits(self) -> np.ndarray:
        window = self.context[:, -self.model.config.block_size:]
        logits, _ = self.model(window)
        return logits[:, -1].float().cpu().numpy()

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self.context = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self._logits()

    def decode(self, ids: np.ndarray) -> np.ndarray:
        new = torch.as_tensor(ids, dtype=torch.long, device=self.device)[:, None]
        self.context = torch.cat([self.context, new], dim=1)
        return self._logits()


def generate_tokens(engine: Engine, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler,
                    num_samples: int = 1) -> Iterator[np.ndarray]:
    """Yield the (num_samples,) ids chosen at each step, all samples decoded as one batch."""
    check_lengths(max_new_tokens, num_samples)
    if max_new_tokens == 0:
        return
    logits = engine.prefill(np.tile(np.asarray(prompt_ids, dtype=np.int64), (num_samples, 1)))
    for step in range(max_new_tokens):
        next_ids = sampler(logits)
        yield next_ids
        if step + 1 < max_new_tokens:
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


def stream(model: MiniGPT, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int = 200, *,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           seed: int | None = None) -> Iterator[str]:
    """Yield the continuation of `prompt` one character at a time.

    Bad arguments raise here, before the first character is asked for.
    """
    sampler = Sampler(temperature, top_k, top_p, seed)
    ids = prompt_ids(tokenizer, prompt)
    check_lengths(max_new_tokens, 1)
    tokens = generate_tokens(RecomputeEngine(model), ids, max_new_tokens, sampler)
    return (tokenizer.decode(next_ids.tolist()) for next_ids in tokens)


def generate(model: MiniGPT, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int = 200, *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None) -> str:
    """Return `prompt` followed by `max_new_tokens` generated characters."""
    return prompt + "".join(stream(model, tokenizer, prompt, max_new_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p, seed=seed))
