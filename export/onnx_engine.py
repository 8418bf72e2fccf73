"""Sampling from an exported graph with onnxruntime: numpy in, numpy out, no torch.

The graph (see `minigpt.export.onnx_graph`) keeps each layer's keys and values
in preallocated (batch, heads, block_size, head_dim) buffers that this engine
owns and binds to the session once through IOBinding, as both the `past`
inputs and the `present` outputs: onnxruntime writes each new position into
them in place, so a decode step allocates nothing and copies one token.

Its metadata carries the model's config and vocabulary, so the .onnx file
samples on its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from minigpt.config import GPTConfig
from minigpt.decoding import check_prefill
from minigpt.errors import CheckpointError, MiniGPTError
from minigpt.export.onnx_graph import (INPUT_IDS, LOGITS, POSITION_IDS, SEQLENS_K, TOTAL_LENGTH, cache_names,
                                       padded_head_dim)
from minigpt.paths import check_onnx_model_path
from minigpt.tokenizer import CharTokenizer

# Threads, measured on 2 cores (bench/README.md): a single row of a small
# model is decoded fastest by one thread (its MatMuls are too small to split:
# handing work to a second thread costs more than it saves); batches, long
# contexts and larger models are faster on every core (onnxruntime's default).
SMALL_MODEL_BYTES = 4_000_000
ALL_CORES = 0  # onnxruntime's own choice: one thread per physical core


def graph_metadata(config: GPTConfig, tokenizer: CharTokenizer) -> dict[str, str]:
    """The same `config` and `vocab` strings a safetensors checkpoint carries."""
    return {"format": "minigpt", "config": config.to_json(), "vocab": tokenizer.to_json()}


def _describe(model: str | os.PathLike | bytes) -> str:
    """How messages name a model given as a path or as serialized bytes."""
    return "the graph" if isinstance(model, bytes) else str(model)


def default_threads(model_bytes: int, batch_size: int) -> int:
    return 1 if batch_size == 1 and model_bytes < SMALL_MODEL_BYTES else ALL_CORES


def open_session(model: str | os.PathLike | bytes, threads: int = ALL_CORES):
    """An onnxruntime CPU session with every graph optimisation on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several types for a file that is not a graph
        name = _describe(model)
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{name} is not a loadable ONNX model ({reason}); "
                              "export one with `minigpt export --onnx`") from None


def check_threads(threads: int | None) -> None:
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise MiniGPTError(f"threads must be a positive integer, got {threads}")


def _bind(binding, name: str, array: np.ndarray, output: bool = False) -> None:
    """Bind `array`'s memory (it must stay alive) as a graph input or output."""
    bind = binding.bind_output if output else binding.bind_input
    bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)


class OnnxEngine:
    """Prefill and decode through onnxruntime, rows of a batch at their own lengths (see `minigpt.decoding`)."""

    def __init__(self, model: str | os.PathLike | bytes, threads: int | None = None):
        """threads: intra-op threads; None picks by model size and batch (see `default_threads`)."""
        check_threads(threads)
        if not isinstance(model, bytes):
            check_onnx_model_path(model)
        self.model, self.threads = model, threads
        self.model_bytes = len(model) if isinstance(model, bytes) else Path(model).stat().st_size
        self.sessions: dict[int, object] = {}  # by thread count: a small model may want two
        self.session = self._session(1)
        metadata = self.session.get_modelmeta().custom_metadata_map
        if "config" not in metadata or "vocab" not in metadata:
            raise CheckpointError(f"{_describe(model)} has no minigpt "
                                  "config/vocab metadata; export it with `minigpt export --onnx`")
        if SEQLENS_K not in {i.name for i in self.session.get_inputs()}:
            raise CheckpointError(f"{_describe(model)} was exported by an older minigpt (its cache is not "
                                  "updated in place); export it again with `minigpt export --onnx --force`")
        try:
            self.config = GPTConfig.from_json(metadata["config"])
            self.tokenizer = CharTokenizer.from_json(metadata["vocab"])
        except MiniGPTError as exc:
            raise CheckpointError(f"the ONNX model has bad metadata: {exc}") from None
        self.block_size = self.config.block_size
        self.past_names = cache_names("past", self.config.num_layers)
        self.present_names = cache_names("present", self.config.num_layers)
        self.start(1)

    def _session(self, batch_size: int):
        threads = self.threads or default_threads(self.model_bytes, batch_size)
        if threads not in self.sessions:
            self.sessions[threads] = open_session(self.model, threads)
        return self.sessions[threads]

    def start(self, batch_size: int) -> None:
        """Empty cache buffers for `batch_size` rows, all at length 0 (reused when the size is unchanged)."""
        if getattr(self, "lengths", None) is not None and len(self.lengths) == batch_size:
            self.lengths[:] = 0
            return
        self.session = self._session(batch_size)
        c = self.config
        # (layer, key/value, row, head, position, dim): any run of rows of one tensor is one contiguous block.
        self.cache = np.zeros((c.num_layers, 2, batch_size, c.num_heads, c.block_size,
                               padded_head_dim(c.head_dim)), dtype=np.float32)
        self.lengths = np.zeros(batch_size, dtype=np.int32)
        self._decoders: dict[int, tuple] = {}

    def _bind_cache(self, binding, first_row: int, rows: int) -> None:
        for names, output in ((self.past_names, False), (self.present_names, True)):
            for name, layer_kind in zip(names, self.cache.reshape(-1, *self.cache.shape[2:])):
                _bind(binding, name, layer_kind[first_row:first_row + rows], output)

    def prefill(self, ids: np.ndarray, first_row: int = 0) -> np.ndarray:
        """Start rows first_row .. first_row + n - 1 afresh from (n, T) ids; return their (n, V) logits."""
        check_prefill(ids, first_row, len(self.lengths), self.block_size)
        rows, length = ids.shape
        self.lengths[first_row:first_row + rows] = 0
        if length == 0:
            return np.zeros((rows, self.config.vocab_size), dtype=np.float32)
        binding = self.session.io_binding()
        feeds = {INPUT_IDS: np.ascontiguousarray(ids, dtype=np.int32),
                 POSITION_IDS: np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
                 SEQLENS_K: np.full(rows, length - 1, dtype=np.int32),
                 TOTAL_LENGTH: np.array(length, dtype=np.int32)}
        for name, array in feeds.items():
            _bind(binding, name, array)
        self._bind_cache(binding, first_row, rows)
        logits = np.empty((rows, length, self.config.vocab_size), dtype=np.float32)
        _bind(binding, LOGITS, logits, output=True)
        self.session.run_with_iobinding(binding)
        self.lengths[first_row:first_row + rows] = length
        return logits[:, -1]

    def _decoder(self, rows: int):
        """The binding for decoding rows 0 .. rows-1, made once: later steps only rewrite its inputs."""
        if rows not in self._decoders:
            binding = self.session.io_binding()
            ids = np.zeros((rows, 1), dtype=np.int32)
            # A row's next position is its length so far, which is also GroupQueryAttention's
            # seqlens_k (total length after this step, minus one): one array serves both.
            positions = np.zeros((rows, 1), dtype=np.int32)
            total = np.zeros((), dtype=np.int32)
            logits = np.zeros((rows, 1, self.config.vocab_size), dtype=np.float32)
            _bind(binding, INPUT_IDS, ids)
            _bind(binding, POSITION_IDS, positions)
            _bind(binding, SEQLENS_K, positions.reshape(rows))
            _bind(binding, TOTAL_LENGTH, total)
            self._bind_cache(binding, 0, rows)
            _bind(binding, LOGITS, logits, output=True)
            self._decoders[rows] = (binding, ids, positions, total, logits)
        return self._decoders[rows]

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Append one id to each of rows 0 .. n-1, each at its own position; return their (n, V) logits.

        The logits are a view of a buffer the next decode overwrites.
        """
        rows = len(ids)
        binding, step_ids, positions, total, logits = self._decoder(rows)
        lengths = self.lengths[:rows]
        longest = lengths.max()
        if longest >= self.block_size:
            raise MiniGPTError(f"a row is full ({self.block_size} positions); prefill it again")
        step_ids[:, 0] = ids
        positions[:, 0] = lengths
        total[()] = longest + 1
        self.session.run_with_iobinding(binding)
        lengths += 1
        return logits[:, 0]

    def move_row(self, source: int, target: int) -> None:
        length = self.lengths[source]
        self.cache[:, :, target, :, :length] = self.cache[:, :, source, :, :length]
        self.lengths[target] = length
