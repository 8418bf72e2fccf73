"""The torch engines, and the Python API: `generate(model, tokenizer, prompt)`.

`KVCacheEngine` runs the model against a `minigpt.kv_cache.KVCache`, so a
call computes only its new positions; `RecomputeEngine` is the reference that
runs the model over each row's whole context again. The decoding loop is
`minigpt.decoding`'s, shared with every engine.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from minigpt.engine_checks import check_extend
from minigpt.kv_cache import KVCache
from minigpt.model import MiniGPT
from minigpt.rows import runs_of_equal
from minigpt.scoring import score
from minigpt.text import EMPTY_PROMPT, join_samples, stream_characters
from minigpt.tokenizer import CharTokenizer


class TorchEngine:
    """What the torch engines share: the model, run where its weights are."""

    verifies_rows_together = True

    def __init__(self, model: MiniGPT):
        self.model, self.block_size, self.device = model, model.config.block_size, model.tok_emb.weight.device


class KVCacheEngine(TorchEngine):
    """Keys and values of earlier positions stay in a static cache: each call computes only the new positions."""

    cache: KVCache | None = None

    def start(self, batch_size: int) -> None:
        if self.cache is None or self.cache.kv.shape[2] != batch_size:
            self.cache = self.model.make_cache(batch_size)

    @torch.inference_mode()
    def extend(self, ids: np.ndarray, start_pos: np.ndarray, first_row: int = 0,
               last_only: bool = False) -> np.ndarray:
        rows = self.cache.kv.shape[2]
        check_extend(ids, start_pos, first_row, rows, self.block_size)
        # Rows first_row .. as a cache of their own: a view, so the keys and values written land in ours.
        cache = self.cache if len(ids) == rows else KVCache(self.cache.kv.narrow(2, first_row, len(ids)))
        logits, _ = self.model(torch.as_tensor(ids, device=self.device), start_pos=start_pos, cache=cache,
                               last_only=last_only)
        return logits.float().cpu().numpy()

    def move_row(self, source: int, target: int, length: int) -> None:
        self.cache.kv[:, :, target, :, :length] = self.cache.kv[:, :, source, :, :length]


class RecomputeEngine(TorchEngine):
    """The reference: every call runs the model over each row's whole context again."""

    def start(self, batch_size: int) -> None:
        self.contexts = [np.zeros(0, dtype=np.int64)] * batch_size  # each row's tokens: its only "cache"

    @torch.inference_mode()
    def extend(self, ids: np.ndarray, start_pos: np.ndarray, first_row: int = 0,
               last_only: bool = False) -> np.ndarray:
        check_extend(ids, start_pos, first_row, len(self.contexts), self.block_size)
        rows, new = ids.shape
        for i, row in enumerate(range(first_row, first_row + rows)):
            self.contexts[row] = np.concatenate([self.contexts[row][:start_pos[i]], ids[i]]).astype(np.int64)
        out = np.zeros((rows, new, self.model.config.vocab_size), dtype=np.float32)
        for first, count in runs_of_equal(np.asarray(start_pos)):  # rows of one length run as one batch
            batch = np.stack(self.contexts[first_row + first:first_row + first + count])
            logits, _ = self.model(torch.as_tensor(batch, device=self.device))
            out[first:first + count] = logits[:, batch.shape[1] - new:].float().cpu().numpy()
        return out[:, -1:] if last_only else out

    def move_row(self, source: int, target: int, length: int) -> None:
        self.contexts[target] = self.contexts[source][:length]


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
             min_p: float | None = None, seed: int | None = None, kv_cache: bool = True, **controls) -> str:
    """Return `prompt` followed by `max_new_tokens` generated characters.

    temperature 0 is greedy; top_k / top_p / min_p filter the candidates; the
    same seed gives the same text; kv_cache=False recomputes the whole context
    each step (the reference the cache is tested against). `controls`: the
    penalties, logit_bias and a pattern (regex, choices or json_schema) of
    `minigpt.controls.make_sampler` (docs/sampling.md); a text whose pattern
    is complete ends there.
    """
    return generate_samples(model, tokenizer, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, min_p=min_p, seed=seed, kv_cache=kv_cache, **controls)[0]


def evaluate_split(model: MiniGPT, ids: np.ndarray, batch_size: int = 64) -> float:
    """Mean next-token loss (nats) over a whole split, read in consecutive block_size windows, `batch_size` of
    them a pass: the scoring the server's `echo` and lm-eval share (`minigpt.scoring`)."""
    model.eval()
    engine = KVCacheEngine(model)
    engine.start(batch_size)
    return -score(engine, ids, rows=batch_size).sum() / (len(ids) - 1)


@dataclass
class SplitBits:
    """A split's summed negative log-likelihood in bits, and what it is read over."""

    bits: float
    characters: int
    bytes: int
    tokens: int

    def per(self, unit: str) -> float:  # "characters", "bytes" or "tokens"
        return self.bits / getattr(self, unit)


def split_bits(model: MiniGPT, tokenizer, corpus, split: str, batch_size: int = 64) -> SplitBits:
    """`minigpt eval`'s figures: every token of the split scored (the first after a newline, as a text begins,
    when the vocabulary has one), summed, over the split's characters, UTF-8 bytes and tokens."""
    ids = tokenizer.corpus_ids(corpus, split)
    characters, size = len(corpus.split(split)), corpus.byte_count(split)
    if EMPTY_PROMPT in tokenizer:
        ids = np.concatenate([[tokenizer.id_of(EMPTY_PROMPT)], ids])
    else:  # the first character has nothing before it to be scored from
        characters, size = characters - 1, size - len(corpus.text(split, 1).encode())
    nats = evaluate_split(model, ids, batch_size) * (len(ids) - 1)
    return SplitBits(nats / math.log(2), characters, size, len(ids) - 1)
