"""Autoregressive generation, shared by every engine.

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
import torch

from minigpt.errors import MiniGPTError
from minigpt.model import MiniGPT
from minigpt.sampling import Sampler
from minigpt.tokenizer import CharTokenizer

EMPTY_PROMPT = "\n"  # what an empty prompt starts from: the start of a new line


class Engine(Protocol):
    block_size: int

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        """Start new sequences from (B, T) ids, T <= block_size; return (B, V) next-token logits."""

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Append (B,) ids to the sequences; return (B, V) next-token logits."""


class RecomputeEngine:
    """The reference: every step runs the model over the whole context again."""

    def __init__(self, model: MiniGPT):
        self.model = model
        self.block_size = model.config.block_size
        self.device = model.tok_emb.weight.device
        self.context: torch.Tensor | None = None

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self.context = torch.as_tensor(ids, device=self.device)
        return self._next_logits()

    def decode(self, ids: np.ndarray) -> np.ndarray:
        self.context = torch.cat([self.context, torch.as_tensor(ids, device=self.device)[:, None]], dim=1)
        return self._next_logits()

    @torch.inference_mode()
    def _next_logits(self) -> np.ndarray:
        return self.model(self.context)[0][:, -1].float().cpu().numpy()


class KVCacheEngine:
    """Keys and values of earlier positions stay in a static cache: each step computes one position."""

    def __init__(self, model: MiniGPT):
        self.model = model
        self.block_size = model.config.block_size
        self.device = model.tok_emb.weight.device
        self.caches = None
        self.length = 0
        self.step_input: torch.Tensor | None = None  # reused (B, 1) buffer for decode

    @torch.inference_mode()
    def prefill(self, ids: np.ndarray) -> np.ndarray:
        batch = ids.shape[0]
        if self.caches is None or self.caches[0].batch_size != batch:
            self.caches = self.model.make_caches(batch)
            self.step_input = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        logits, _ = self.model(torch.as_tensor(ids, device=self.device), caches=self.caches, start=0)
        self.length = ids.shape[1]
        return logits[:, -1].float().cpu().numpy()

    @torch.inference_mode()
    def decode(self, ids: np.ndarray) -> np.ndarray:
        self.step_input.copy_(torch.from_numpy(ids)[:, None])
        logits, _ = self.model(self.step_input, caches=self.caches, start=self.length)
        self.length += 1
        return logits[:, -1].float().cpu().numpy()


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


def stream_batch(model: MiniGPT, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int = 200, *,
                 num_samples: int = 1, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None,
                 kv_cache: bool = True) -> Iterator[list[str]]:
    """Yield, at each step, the next character of each of `num_samples` samples.

    Bad arguments raise here, before the first step is asked for.
    """
    sampler = Sampler(temperature, top_k, top_p, seed)
    ids = prompt_ids(tokenizer, prompt)
    check_lengths(max_new_tokens, num_samples)
    engine = KVCacheEngine(model) if kv_cache else RecomputeEngine(model)
    steps = generate_tokens(engine, ids, max_new_tokens, sampler, num_samples)
    return ([tokenizer.chars[i] for i in next_ids] for next_ids in steps)


def stream(model: MiniGPT, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int = 200,
           **options) -> Iterator[str]:
    """Yield the continuation of `prompt` one character at a time (options as in `generate`)."""
    return (pieces[0] for pieces in stream_batch(model, tokenizer, prompt, max_new_tokens, **options))


def generate_samples(model: MiniGPT, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int = 200, *,
                     num_samples: int = 1, **options) -> list[str]:
    """`num_samples` continuations of `prompt`, decoded together as one batch, each with the prompt."""
    columns = list(stream_batch(model, tokenizer, prompt, max_new_tokens, num_samples=num_samples, **options))
    return [prompt + "".join(sample) for sample in zip(*columns)] if columns else [prompt] * num_samples


def generate(model: MiniGPT, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int = 200, *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, kv_cache: bool = True) -> str:
    """Return `prompt` followed by `max_new_tokens` generated characters.

    temperature 0 is greedy; top_k / top_p filter the candidates; the same
    seed gives the same text; kv_cache=False recomputes the whole context
    each step (the reference the cache is tested against).
    """
    return generate_samples(model, tokenizer, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, kv_cache=kv_cache)[0]
