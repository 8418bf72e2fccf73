"""Generation with the torch engines: the model recomputed each step, or with its KV-cache.

The decoding loop, the policy past the block size and the sampler are shared
with every engine and live in `minigpt.decoding`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from minigpt.decoding import join_samples, stream_characters
from minigpt.model import MiniGPT
from minigpt.tokenizer import CharTokenizer


def last_position(logits: torch.Tensor) -> np.ndarray:
    """(B, T, V) logits -> the (B, V) numpy array the sampler reads."""
    return logits[:, -1].float().cpu().numpy()


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
        return last_position(self.model(self.context)[0])


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
        return last_position(logits)

    @torch.inference_mode()
    def decode(self, ids: np.ndarray) -> np.ndarray:
        self.step_input.copy_(torch.from_numpy(ids)[:, None])
        logits, _ = self.model(self.step_input, caches=self.caches, start=self.length)
        self.length += 1
        return last_position(logits)


def torch_engine(model: MiniGPT, kv_cache: bool = True) -> KVCacheEngine | RecomputeEngine:
    return KVCacheEngine(model) if kv_cache else RecomputeEngine(model)


def stream_batch(model: MiniGPT, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int = 200, *,
                 kv_cache: bool = True, **options) -> Iterator[list[str]]:
    """Yield, at each step, the next character of each sample (options as in `generate_samples`)."""
    return stream_characters(torch_engine(model, kv_cache), tokenizer, prompt, max_new_tokens, **options)


def stream(model: MiniGPT, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int = 200,
           **options) -> Iterator[str]:
    """Yield the continuation of `prompt` one character at a time (options as in `generate`)."""
    return (pieces[0] for pieces in stream_batch(model, tokenizer, prompt, max_new_tokens, **options))


def generate_samples(model: MiniGPT, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int = 200, *,
                     num_samples: int = 1, **options) -> list[str]:
    """`num_samples` continuations of `prompt`, decoded together as one batch, each with the prompt."""
    steps = stream_batch(model, tokenizer, prompt, max_new_tokens, num_samples=num_samples, **options)
    return join_samples(prompt, steps, num_samples)


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
