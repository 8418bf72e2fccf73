"""The one sampler every engine shares.

Engines differ only in how they compute logits; turning last-position logits
into tokens happens here, on numpy arrays, so the onnxruntime engine needs no
torch and the same seed gives the same text on every engine.

Each row of a batch draws from its own random stream, spawned from the seed
and the row's index alone, so a sample's text never depends on what else is
decoded beside it: sample i of `--num-samples N --seed S` is the same with any
N, and the server gives a request the same text under any load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from minigpt.config import check_seed
from minigpt.errors import ConfigError


GREEDY_BELOW = 1e-5  # temperatures under this are greedy


@dataclass
class Sampler:
    """temperature 0 (or under 1e-5) is greedy; top_k keeps the k likeliest tokens; top_p the smallest set
    holding p of the mass."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    _streams: list[np.random.Generator] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}", "temperature")
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise ConfigError(f"top_k must be a positive integer, got {self.top_k}", "top_k")
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise ConfigError(f"top_p must be in [0, 1] (0 keeps the likeliest token alone), got {self.top_p}",
                              "top_p")
        if self.seed is not None:
            check_seed(self.seed)

    def streams(self, count: int) -> list[np.random.Generator | None]:
        """The random streams of rows 0 .. count-1: row i's depends on the seed and i alone. A greedy sampler
        draws nothing: its rows get None (making a stream costs ~40 us, a tenth of a short greedy reply)."""
        if self.greedy:
            return [None] * count
        return [np.random.default_rng(child) for child in np.random.SeedSequence(self.seed).spawn(count)]

    @property
    def greedy(self) -> bool:
        # As vLLM: below 1e-5 sampling is greedy in all but name, and dividing logits by 5e-324 overflows.
        return self.temperature < GREEDY_BELOW

    def _weights(self, logits: np.ndarray) -> np.ndarray:
        """(B, V) unnormalised probabilities at this temperature, zero for the tokens top-k and top-p filter out.

        Every step samples with it, so it is written in few numpy calls (each
        costs microseconds on rows of a hundred tokens); the arithmetic is
        that of a softmax over the filtered logits, value for value."""
        scaled = np.divide(logits, self.temperature, dtype=np.float64)
        if self.top_k is not None and self.top_k < scaled.shape[-1]:
            kth_largest = np.partition(scaled, -self.top_k, axis=-1)[:, -self.top_k, None]
            scaled[scaled < kth_largest] = -np.inf
        top_p = self.top_p is not None and self.top_p < 1
        if top_p:  # each row's tokens, likeliest first (ranked now: the weights are made in scaled's memory)
            ranked = (-scaled).argsort(axis=-1, kind="stable")
        # The likeliest token is never filtered out, so the shift by the maximum is the same before and after.
        # (Reductions as ufunc methods: the same arithmetic as .max() and .sum(), without their Python layer.)
        weights = np.exp(np.subtract(scaled, np.maximum.reduce(scaled, axis=-1, keepdims=True), out=scaled),
                         out=scaled)
        if top_p:
            if len(ranked) > 1:  # as indices into the flattened batch (a fraction of take_along_axis's cost)
                ranked += np.arange(0, scaled.size, scaled.shape[-1])[:, None]
            flat_weights = weights.reshape(-1)
            sorted_weights = flat_weights[ranked]
            sorted_probs = sorted_weights / np.add.reduce(sorted_weights, axis=-1, keepdims=True)
            # Drop a token once the tokens ranked above it already hold top_p
            # of the mass; the likeliest token always stays.
            drop = np.add.accumulate(sorted_probs, axis=-1) - sorted_probs >= self.top_p
            drop[:, 0] = False  # at top_p 0 too
            flat_weights[ranked[drop]] = 0.0
        return weights

    def __call__(self, logits: np.ndarray, streams: list[np.random.Generator] | None = None) -> np.ndarray:
        """Pick one token id per row of (B, V) logits, row i drawing from streams[i] (by default this sampler's
        own streams for rows 0 .. B-1); returns (B,) int64."""
        if self.greedy:
            return logits.argmax(axis=-1).astype(np.int64, copy=False)
        if streams is None:
            if len(self._streams) != len(logits):
                self._streams = self.streams(len(logits))
            streams = self._streams
        return self.pick(logits, np.array([stream.random() for stream in streams]))

    def pick(self, logits: np.ndarray, draws: np.ndarray) -> np.ndarray:
        """Inverse-CDF sampling: row i's token for its uniform draw draws[i], vectorised over the batch."""
        if self.greedy:
            return logits.argmax(axis=-1).astype(np.int64, copy=False)
        # The first token whose cumulative weight reaches the draw's share of the row's total. Unnormalised,
        # the last kept token's cumulative weight is the total itself, so no draw can walk past it.
        cumulative = np.add.accumulate(self._weights(logits), axis=-1)  # np.cumsum, without its Python layer
        return np.add.reduce(cumulative < (draws * cumulative[:, -1])[:, None], axis=-1)


def rows_alike(samplers: list[Sampler]) -> list[tuple[list[int], Sampler]]:
    """The rows grouped by how they sample (temperature, top-k, top-p), each group with one of its samplers:
    a group is picked as one batch, each row still with its own draw."""
    groups: dict[tuple, list[int]] = {}
    for row, sampler in enumerate(samplers):
        groups.setdefault((sampler.temperature, sampler.top_k, sampler.top_p), []).append(row)
    return [(rows, samplers[rows[0]]) for rows in groups.values()]


def read_ahead(streams: list[np.random.Generator], count: int) -> np.ndarray:
    """The next `count` draws of each stream, (len(streams), count): exactly what `count` calls of
    `stream.random()` return (speculative decoding samples several positions at once with them)."""
    return np.array([stream.random(count) for stream in streams])  # np.stack costs twice as much here


def give_back(stream: np.random.Generator, count: int) -> None:
    """Undo the last `count` draws of `stream`, so that its next draw is the first of them again. A PCG64
    stream (what `Sampler.streams` makes) steps back by advancing a whole period less `count`."""
    if count:
        stream.bit_generator.advance(PCG64_PERIOD - count)


PCG64_PERIOD = 2 ** 128
