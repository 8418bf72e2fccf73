"""The one sampler every engine shares: logits to a token, on numpy arrays (the onnxruntime path needs no torch).

Each row of a batch draws from its own random stream, spawned from the seed
and the row's index alone, so a sample's text never depends on what else is
decoded beside it: sample i of `--num-samples N --seed S` is the same with any
N, and the server gives a request the same text under any load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from minigpt.settings import check_seed
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
    _streams: list = field(init=False, repr=False, default_factory=list)

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

    @property
    def greedy(self) -> bool:
        # As vLLM: below 1e-5 sampling is greedy in all but name, and dividing logits by 5e-324 overflows.
        return self.temperature < GREEDY_BELOW

    def streams(self, count: int) -> list[np.random.Generator | None]:
        """The random streams of rows 0 .. count-1: row i's depends on the seed and i alone (None when greedy:
        it draws nothing)."""
        if self.greedy:
            return [None] * count
        return [np.random.default_rng(child) for child in np.random.SeedSequence(self.seed).spawn(count)]

    def weights(self, logits: np.ndarray) -> np.ndarray:
        """(B, V) probabilities up to a factor, at this temperature, zero for tokens top-k and top-p leave out."""
        scaled = np.divide(logits, self.temperature, dtype=np.float64)
        if self.top_k is not None and self.top_k < scaled.shape[-1]:
            kth_largest = np.partition(scaled, -self.top_k, axis=-1)[:, -self.top_k, None]
            scaled[scaled < kth_largest] = -np.inf
        weights = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
        if self.top_p is not None and self.top_p < 1:
            rows, ranked = np.arange(len(scaled))[:, None], np.argsort(-scaled, axis=-1, kind="stable")
            ranked_weights = weights[rows, ranked]  # likeliest first
            ranked_probs = ranked_weights / ranked_weights.sum(axis=-1, keepdims=True)
            # A token is dropped once the tokens ranked above it hold top_p; the likeliest always stays.
            drop = np.cumsum(ranked_probs, axis=-1) - ranked_probs >= self.top_p
            drop[:, 0] = False
            weights[rows, ranked] = np.where(drop, 0.0, ranked_weights)
        return weights

    def pick(self, logits: np.ndarray, draws: np.ndarray) -> np.ndarray:
        """Inverse-CDF sampling: row i's token for its uniform draw draws[i] (argmax when greedy); (B,) int64."""
        if self.greedy:
            return logits.argmax(axis=-1).astype(np.int64, copy=False)
        # The first token whose cumulative weight reaches the draw's share of the total.
        cumulative = np.cumsum(self.weights(logits), axis=-1)
        return (cumulative < (draws * cumulative[:, -1])[:, None]).sum(axis=-1)

    def __call__(self, logits: np.ndarray, streams: list | None = None) -> np.ndarray:
        """One token per row of (B, V) logits, row i drawing from streams[i] (by default this sampler's own)."""
        if self.greedy:
            return self.pick(logits, None)
        if streams is None:
            if len(self._streams) != len(logits):
                self._streams = self.streams(len(logits))
            streams = self._streams
        return self.pick(logits, np.array([stream.random() for stream in streams]))


def rows_alike(samplers: list[Sampler]) -> list[tuple[list[int], Sampler]]:
    """The rows grouped by how they sample (temperature, top-k, top-p), each group with one of its samplers:
    a group is picked as one batch, each row still with its own draw."""
    groups: dict[tuple, list[int]] = {}
    for row, sampler in enumerate(samplers):
        groups.setdefault((sampler.temperature, sampler.top_k, sampler.top_p), []).append(row)
    return [(rows, samplers[rows[0]]) for rows in groups.values()]
