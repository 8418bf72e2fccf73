"""Generation with the torch engines: the model recomputed each step, or with its KV-cache.

The decoding loop, the policy past the block size and the sampler are shared
with every engine and live in `minigpt.decoding`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from minigpt.decoding import check_prefill, join_samples, runs_of_equal, stream_characters
from minigpt.model import KVCache, MiniGPT
from minigpt.tokenizer import CharTokenizer


def last_position(logits: torch.Tensor) -> np.ndarray:
    """(B, T, V) logits -> the (B, V) numpy array the sampler reads."""
    return logits[:, -1].float().cpu().numpy()


class RecomputeEngine:
    """The reference: every step runs the model over each row's whole context again."""

    def __init__(self, model: MiniGPT):
        self.model = model
        self.block_size = model.config.block_size
        self.device = model.tok_emb.weight.device
        self.contexts: list[np.ndarray] = []

    def start(self, batch_size: int) -> None:
        self.contexts = [np.zeros(0, dtype=np.int64)] * batch_size

    def prefill(self, ids: np.ndarray, first_row: int = 0) -> np.ndarray:
        check_prefill(ids, first_row, len(self.contexts), self.block_size)
        self.contexts[first_row:first_row + len(ids)] = list(np.asarray(ids, dtype=np.int64))
        return self._next_logits(range(first_row, first_row + len(ids)))

    def decode(self, ids: np.ndarray) -> np.ndarray:
        self.contexts[:len(ids)] = [np.append(context, i) for context, i in zip(self.contexts, ids)]
        return self._next_logits(range(len(ids)))

    def move_row(self, source: int, target: int) -> None:
        self.contexts[target] = self.contexts[source]

    @torch.inference_mode()
    def _next_logits(self, rows: range) -> np.ndarray:
        lengths = np.array([len(self.contexts[row]) for row in rows])
        out = np.zeros((len(rows), self.model.config.vocab_size), dtype=np.float32)
        for first, count in runs_of_equal(lengths):  # rows of one length run as one batch
            if lengths[first]:
                batch = np.stack(self.contexts[rows[first]:rows[first] + count])
                out[first:first + count] = last_position(self.model(torch.as_tensor(batch, device=self.device))[0])
        return out


class KVCacheEngine:
    """Keys and values of earlier positions stay in a static cache: each step computes one position per row."""

    def __init__(self, model: MiniGPT):
        self.model = model
        self.block_size = model.config.block_size
        self.device = model.tok_emb.weight.device
        self.cache: KVCache | None = None
        self.step_input: torch.Tensor | None = None  # reused (B, 1) buffer for decode

    def start(self, batch_size: int) -> None:
        if self.cache is None or self.cache.batch_size != batch_size:
            self.cache = self.model.make_cache(batch_size)
            self.step_input = torch.zeros((batch_size, 1), dtype=torch.long, device=self.device)
        self.cache.lengths[:] = 0

    @torch.inference_mode()
    def prefill(self, ids: np.ndarray, first_row: int = 0) -> np.ndarray:
        check_prefill(ids, first_row, self.cache.batch_size, self.block_size)
        rows = self.cache.rows(first_row, len(ids))
        rows.lengths[:] = 0
        if ids.shape[1] == 0:
            return np.zeros((len(ids), self.model.config.vocab_size), dtype=np.float32)
        logits, _ = self.model(torch.as_tensor(ids, device=self.device), cache=rows)
        return last_position(logits)

    @torch.inference_mode()
    def decode(self, ids: np.ndarray) -> np.ndarray:
        rows = len(ids)
        step_input = self.step_input if rows == len(self.step_input) else self.step_input[:rows]
        step_input.copy_(torch.from_numpy(ids)[:, None])
        logits, _ = self.model(step_input, cache=self.cache.rows(0, rows))
        return last_position(logits)

    def move_row(self, source: int, target: int) -> None:
        length = int(self.cache.lengths[source])
        self.cache.kv[:, :, target, :, :length] = self.cache.kv[:, :, source, :, :length]
        self.cache.lengths[target] = length


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
