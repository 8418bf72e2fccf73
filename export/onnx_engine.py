"""Sampling from an exported graph with onnxruntime: numpy in, numpy out, no torch.

The graph (written by `minigpt.export.onnx_export`) serves prefill and
decode alike: inputs `input_ids` (batch, seq) and `past.{i}.key` /
`past.{i}.value` (batch, heads, past, head_dim) for each layer i, outputs
`logits` (batch, seq, vocab) and `present.{i}.key` / `present.{i}.value`
(batch, heads, past + seq, head_dim). Its metadata carries the model's
config and vocabulary, so the .onnx file samples on its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from minigpt.config import GPTConfig
from minigpt.errors import CheckpointError, MiniGPTError
from minigpt.tokenizer import CharTokenizer

INPUT_IDS = "input_ids"
LOGITS = "logits"


def cache_names(prefix: str, num_layers: int) -> list[str]:
    """Graph names of every layer's keys and values, in graph order: prefix.0.key, prefix.0.value, ..."""
    return [f"{prefix}.{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]


def graph_metadata(config: GPTConfig, tokenizer: CharTokenizer) -> dict[str, str]:
    """The same `config` and `vocab` strings a safetensors checkpoint carries."""
    return {"format": "minigpt", "config": config.to_json(), "vocab": tokenizer.to_json()}


def _describe(model: str | os.PathLike | bytes) -> str:
    """How messages name a model given as a path or as serialized bytes."""
    return "the graph" if isinstance(model, bytes) else str(model)


def open_session(model: str | os.PathLike | bytes, threads: int | None = None):
    """An onnxruntime CPU session with every graph optimisation on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several types for a file that is not a graph
        name = _describe(model)
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{name} is not a loadable ONNX model ({reason}); "
                              "export one with `minigpt export --onnx`") from None


class OnnxEngine:
    """Prefill and decode through onnxruntime, the cache carried from one run to the next.

    Each step feeds the previous run's present arrays back as its past: they
    stay in onnxruntime's own buffers (numpy views, no copy), so the only
    copy per step is the graph's append of the new position.
    """

    def __init__(self, model: str | os.PathLike | bytes, threads: int | None = None):
        if not isinstance(model, bytes) and not Path(model).is_file():
            raise CheckpointError(f"ONNX model not found: {model}; export one with "
                                  "`minigpt export --onnx --checkpoint CKPT`")
        self.session = open_session(model, threads)
        metadata = self.session.get_modelmeta().custom_metadata_map
        if "config" not in metadata or "vocab" not in metadata:
            raise CheckpointError(f"{_describe(model)} has no minigpt "
                                  "config/vocab metadata; export it with `minigpt export --onnx`")
        try:
            self.config = GPTConfig.from_json(metadata["config"])
            self.tokenizer = CharTokenizer.from_json(metadata["vocab"])
        except MiniGPTError as exc:
            raise CheckpointError(f"the ONNX model has bad metadata: {exc}") from None
        self.block_size = self.config.block_size
        self.past_names = cache_names("past", self.config.num_layers)
        self.output_names = [LOGITS, *cache_names("present", self.config.num_layers)]
        self.past: list[np.ndarray] = []

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        empty = np.zeros((ids.shape[0], self.config.num_heads, 0, self.config.head_dim), dtype=np.float32)
        return self._run(ids, [empty] * len(self.past_names))

    def decode(self, ids: np.ndarray) -> np.ndarray:
        return self._run(ids[:, None], self.past)

    def _run(self, ids: np.ndarray, past: list[np.ndarray]) -> np.ndarray:
        feeds = {INPUT_IDS: np.ascontiguousarray(ids, dtype=np.int64), **dict(zip(self.past_names, past))}
        logits, *self.past = self.session.run(self.output_names, feeds)
        return logits[:, -1]
