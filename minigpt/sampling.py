"""The one sampler every engine shares: logits to a token, on numpy arrays (the onnxruntime path needs no torch).

Each row of a batch draws from its own random stream, spawned from the seed
and the row's index alone, so a sample's text never depends on what else is
decoded beside it: sample i of `--num-samples N --seed S` is the same with any
N, and the server gives a request the same text under any load.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minigpt.settings import POSITIVE, SEED, Bounded, check_bounds, option

GREEDY_BELOW = 1e-5  # as vLLM: below it sampling is greedy in all but name, and 5e-324 overflows a division


@dataclass
class Sampler:
    """How each row's logits become its token; every field is checked where a value comes in (flag or request)."""

    temperature: float = option(1.0, "divides the logits; 0 is greedy", Bounded(float, 0))
    top_k: int | None = option(None, "sample among the k likeliest tokens only", POSITIVE)
    top_p: float | None = option(None, "sample from the smallest set of likeliest tokens holding this much "
                                 "probability (0 keeps the likeliest alone)", Bounded(float, 0, 1))
    min_p: float | None = option(None, "drop tokens less than this fraction as likely as the likeliest, after top-p",
                                 Bounded(float, 0, 1))
    seed: int | None = option(None, "same seed, same text", SEED)
    reads_text = False  # a sampler whose controls read the text so far adjusts the logits first (minigpt.controls)

    def __post_init__(self) -> None:
        check_bounds(self)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def streams(self, count: int) -> list[np.random.Generator | None]:
        """Rows 0 .. count-1's random streams, row i's from the seed and i alone (None when greedy)."""
        if self.greedy:
            return [None] * count
        return [np.random.default_rng(child) for child in np.random.SeedSequence(self.seed).spawn(count)]

    def weights(self, logits: np.ndarray) -> np.ndarray:
        """(B, V) probabilities over the likeliest's (so it weighs 1), zero for what top-k, top-p and min-p drop."""
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
        if self.min_p:  # the likeliest token weighs 1, so a weight is its probability over the likeliest's
            weights[weights < self.min_p] = 0.0
        return weights

    def pick(self, logits: np.ndarray, draws: np.ndarray | None) -> np.ndarray:
        """Inverse-CDF sampling: row i's token for its uniform draw draws[i] (argmax when greedy); (B,) int64."""
        if self.greedy:
            return logits.argmax(axis=-1).astype(np.int64, copy=False)
        # The first token whose cumulative weight reaches the draw's share of the total.
        cumulative = np.cumsum(self.weights(logits), axis=-1)
        return (cumulative < (draws * cumulative[:, -1])[:, None]).sum(axis=-1)


def rows_alike(samplers: list[Sampler]) -> list[tuple[list[int], Sampler]]:
    """The rows grouped by how they sample, each group with one of its samplers (picked as one batch)."""
    groups: dict[tuple, list[int]] = {}
    for row, sampler in enumerate(samplers):
        groups.setdefault((sampler.temperature, sampler.top_k, sampler.top_p, sampler.min_p), []).append(row)
    return [(rows, samplers[rows[0]]) for rows in groups.values()]
