"""The sampler's arithmetic in fewer numpy calls: a speed layer over `minigpt.sampling.Sampler`.

Every decode step samples, and on rows of a hundred tokens each numpy call
costs microseconds of dispatch, so `Sampler.weights` written plainly costs a
sampled step about a tenth more than these few calls (bench/README.md,
"Sampling"). `FastSampler` computes the same numbers, value for value (the
tests compare the two on random logits): the softmax is made in place, the
reductions are ufunc methods without numpy's Python layer, and top-p indexes
the flattened batch. `minigpt generate` and `minigpt serve` sample with it.
"""

from __future__ import annotations

import numpy as np

from minigpt.sampling import Sampler


class FastSampler(Sampler):
    def weights(self, logits: np.ndarray) -> np.ndarray:
        scaled = np.divide(logits, self.temperature, dtype=np.float64)
        if self.top_k is not None and self.top_k < scaled.shape[-1]:
            kth_largest = np.partition(scaled, -self.top_k, axis=-1)[:, -self.top_k, None]
            scaled[scaled < kth_largest] = -np.inf
        top_p = self.top_p is not None and self.top_p < 1
        if top_p:  # ranked now: the weights are made in scaled's memory
            ranked = (-scaled).argsort(axis=-1, kind="stable")
        weights = np.exp(np.subtract(scaled, np.maximum.reduce(scaled, axis=-1, keepdims=True), out=scaled),
                         out=scaled)
        if top_p:
            if len(ranked) > 1:  # as indices into the flattened batch
                ranked += np.arange(0, scaled.size, scaled.shape[-1])[:, None]
            flat_weights = weights.reshape(-1)
            ranked_weights = flat_weights[ranked]
            ranked_probs = ranked_weights / np.add.reduce(ranked_weights, axis=-1, keepdims=True)
            drop = np.add.accumulate(ranked_probs, axis=-1) - ranked_probs >= self.top_p
            drop[:, 0] = False
            flat_weights[ranked[drop]] = 0.0
        if self.min_p:
            weights[weights < self.min_p] = 0.0
        return weights

    def pick(self, logits: np.ndarray, draws: np.ndarray) -> np.ndarray:
        if self.greedy:
            return logits.argmax(axis=-1).astype(np.int64, copy=False)
        cumulative = np.add.accumulate(self.weights(logits), axis=-1)
        return np.add.reduce(cumulative < (draws * cumulative[:, -1])[:, None], axis=-1)
