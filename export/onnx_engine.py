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
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minigpt.config import GPTConfig
from minigpt.settings import DRAFT_TOKENS, MOST_DRAFT_TOKENS
from minigpt.engine_checks import check_extend
from minigpt.devices import check_threads, threads_for
from minigpt.errors import CheckpointError, MiniGPTError
from minigpt.export.onnx_graph import (INPUT_IDS, LOGIT_POSITIONS, LOGITS, POSITION_IDS, QUERY_LENGTHS, SEQLENS_K,
                                       TOTAL_LENGTH, cache_names, padded_head_dim)
from minigpt.paths import check_onnx_model_path
from minigpt.subword import TOKENIZER_META, tokenizer_from_metadata
from minigpt.tokenizer import CharTokenizer

KEPT_STEP_TOKENS = MOST_DRAFT_TOKENS + 1  # bindings for up to this many new tokens are kept (decoding, verifying)
# A row alone verifies up to the default most guesses and its pending token: a batch of one binds every such width
# when it starts, so that a process's first steps cost what its later ones do.
BOUND_AT_START = DRAFT_TOKENS + 1
# The most bindings kept, the least recently used dropped first: a server's admissions write prompts of every
# length at every row, and each shape kept holds its own buffers.
KEPT_STEPS = 128


def graph_metadata(config: GPTConfig, tokenizer: CharTokenizer) -> dict[str, str]:
    """The same `config` and `vocab` (or `tokenizer`) strings a safetensors checkpoint carries."""
    return {"format": "minigpt", "config": config.to_json(), **tokenizer.metadata()}


def _describe(model: str | os.PathLike | bytes) -> str:
    """How messages name a model given as a path or as serialized bytes."""
    return "the graph" if isinstance(model, bytes) else str(model)


def open_session(model: str | os.PathLike | bytes, threads: int):
    """An onnxruntime CPU session with every graph optimisation on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        # The graph's residual adds and LayerNorms stay the standard operators (see `minigpt.export.onnx_graph`):
        # onnxruntime would fuse the last one into its slower SkipLayerNormalization.
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                    providers=["CPUExecutionProvider"], disabled_optimizers=["SkipLayerNormFusion"])
    except Exception as exc:  # onnxruntime raises several types for a file that is not a graph
        name = _describe(model)
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{name} is not a loadable ONNX model ({reason}); "
                              "export one with `minigpt export --onnx`") from None


def _bind(binding, name: str, value, output: bool = False) -> None:
    """Bind an array, through an OrtValue over its memory (the array must stay alive), or an OrtValue, as a graph
    input or output: an OrtValue binds in about a tenth of the time a raw pointer takes (which pybind describes
    anew), and making one costs less than describing the pointer."""
    if isinstance(value, np.ndarray):
        from onnxruntime import OrtValue

        value = OrtValue.ortvalue_from_numpy(value)
    (binding.bind_ortvalue_output if output else binding.bind_ortvalue_input)(name, value)


class OnnxEngine:
    """Prefill and decode through onnxruntime, rows of a batch at their own lengths (see `minigpt.decoding`)."""

    def __init__(self, model: str | os.PathLike | bytes, threads: int | None = None):
        """threads: intra-op threads; None picks by model size and batch (see `minigpt.devices.threads_for`)."""
        check_threads(threads)
        if not isinstance(model, bytes):
            check_onnx_model_path(model)
        self.model, self.threads = model, threads
        self.model_bytes = len(model) if isinstance(model, bytes) else Path(model).stat().st_size
        self.sessions: dict[int, object] = {}  # by thread count: a small model may want two
        self.session = self._session(1)
        metadata = self.session.get_modelmeta().custom_metadata_map
        # Threads are chosen by the weights' size, and the file also holds the metadata: a trained model's
        # draft table can outweigh its weights, which would pick threads for a model it is not. The session
        # opened to read it is kept if it fits.
        self.model_bytes -= sum(len(value) for value in metadata.values())
        self.sessions = {count: session for count, session in self.sessions.items() if count == self._threads(1)}
        if "config" not in metadata or not {"vocab", TOKENIZER_META} & metadata.keys():
            raise CheckpointError(f"{_describe(model)} has no minigpt "
                                  "config/vocab metadata; export it with `minigpt export --onnx`")
        inputs = {i.name for i in self.session.get_inputs()}
        if SEQLENS_K not in inputs:
            raise CheckpointError(f"{_describe(model)} was exported by an older minigpt (its cache is not "
                                  "updated in place); export it again with `minigpt export --onnx --force`")
        # A graph exported before `query_seqlens` appends several tokens after a past to one row per call:
        # verifying guesses for a batch would cost a call per row, which speculative decoding knows not to pay.
        self.verifies_rows_together = QUERY_LENGTHS in inputs
        self._keeps_positions = LOGIT_POSITIONS in inputs  # an older graph returns every position's logits
        try:
            self.config = GPTConfig.from_json(metadata["config"])
        except MiniGPTError as exc:
            raise CheckpointError(f"the ONNX model has bad metadata: {exc}") from None
        self.tokenizer = tokenizer_from_metadata(metadata, "the ONNX model")
        self.block_size = self.config.block_size
        self.metadata = metadata
        self.past_names = cache_names("past", self.config.num_layers)
        self.present_names = cache_names("present", self.config.num_layers)
        self._offsets = np.arange(self.block_size, dtype=np.int32)
        self.cache = None
        self.start(1)

    def ngram_draft(self):
        """The n-gram draft table the checkpoint carried into this graph (`minigpt.drafts`), or None."""
        from minigpt.drafts import NGRAM_META, NGramDraft

        return NGramDraft.from_metadata(self.metadata[NGRAM_META]) if NGRAM_META in self.metadata else None

    def _threads(self, batch_size: int) -> int:
        return self.threads or threads_for(batch_size, self.model_bytes)

    def _session(self, batch_size: int):
        threads = self._threads(batch_size)
        if threads not in self.sessions:
            self.sessions[threads] = open_session(self.model, threads)
        return self.sessions[threads]

    def start(self, batch_size: int) -> None:
        """Cache buffers for `batch_size` rows (reused when the size is unchanged)."""
        if getattr(self, "cache", None) is not None and self.cache.shape[2] == batch_size:
            return
        self.session = self._session(batch_size)
        c = self.config
        # (layer, key/value, row, head, position, dim): any run of rows of one tensor is one contiguous block.
        self.cache = np.zeros((c.num_layers, 2, batch_size, c.num_heads, c.block_size,
                               padded_head_dim(c.head_dim)), dtype=np.float32)
        self._steps: OrderedDict[tuple[int, int, int], _Step] = OrderedDict()
        self._cached_values: dict[tuple[int, int], list] = {}  # the cache's OrtValues, by run of rows
        if batch_size == 1:
            for new in range(1, BOUND_AT_START + 1):
                self._step(0, 1, new)

    def extend(self, ids: np.ndarray, start_pos: np.ndarray, first_row: int = 0,
               last_only: bool = False) -> np.ndarray:
        """Write (n, k) ids into rows first_row .. first_row+n-1 at positions start_pos[i] onwards; return the
        (n, k, V) logits of the new positions (last_only: (n, 1, V), the last one's), a view of a buffer the
        next call of this shape overwrites."""
        end = check_extend(ids, start_pos, first_row, self.cache.shape[2], self.block_size)
        rows, new = ids.shape
        if new > 1 and rows > 1 and end > new and not self.verifies_rows_together:  # an older graph
            return np.concatenate([self.extend(ids[i:i + 1], start_pos[i:i + 1], first_row + i, last_only).copy()
                                   for i in range(rows)])
        if last_only and not self._keeps_positions:
            return self.extend(ids, start_pos, first_row)[:, -1:]
        step = self._step(first_row, rows, new, 1 if last_only else new)
        step.ids[:] = ids
        # GroupQueryAttention reads each row's old length from seqlens_k (its total after this run, minus
        # one) less query_seqlens (its new tokens: all of them) and appends the new keys after it: a prefill,
        # a decode step and a k-token extend of any rows are one call. Positions past a row's length are
        # simply overwritten.
        # Copies, not arithmetic: right after a graph call a numpy ufunc costs microseconds of cold cache.
        if new == 1:
            step.positions[:, 0] = start_pos
        elif rows == 1:
            step.positions[0] = self._offsets[end - new:end]
        else:  # rows of several tokens (a prefill): seqlens_k has an array of its own (see _step)
            np.add(start_pos[:, None], self._offsets[:new], out=step.positions)
            np.add(start_pos, new - 1, out=step.seqlens)
        step.total[()] = end
        self.session.run_with_iobinding(step.binding)
        return step.logits

    def _step(self, first_row: int, rows: int, new: int, kept: int | None = None) -> "_Step":
        """The binding for `new` tokens in rows first_row .. first_row+rows-1, returning the logits of the last
        `kept` of them (all by default); the small shapes decoding repeats (a few tokens) are made once and
        only have their inputs rewritten."""
        kept = new if kept is None else kept
        key = (first_row, rows, new, kept)
        step = self._steps.get(key)
        if step is not None:
            self._steps.move_to_end(key)
            return step
        positions = np.zeros((rows, new), dtype=np.int32)
        # A row's last new position is also GroupQueryAttention's seqlens_k (its total length after this
        # call, minus one): for one new token, or one row, the same memory serves both.
        seqlens = positions[:, -1] if new == 1 or rows == 1 else np.zeros(rows, dtype=np.int32)
        step = _Step(self.session.io_binding(), np.zeros((rows, new), dtype=np.int32), positions, seqlens,
                     np.zeros((), dtype=np.int32), np.zeros((rows, kept, self.config.vocab_size), dtype=np.float32))
        inputs = [(INPUT_IDS, step.ids), (POSITION_IDS, step.positions), (SEQLENS_K, step.seqlens),
                  (TOTAL_LENGTH, step.total)]
        if self.verifies_rows_together:
            step.query_lengths = np.full(rows, new, dtype=np.int32)
            inputs.append((QUERY_LENGTHS, step.query_lengths))
        if self._keeps_positions:
            step.kept_positions = np.arange(new - kept, new, dtype=np.int64)
            inputs.append((LOGIT_POSITIONS, step.kept_positions))
        for name, array in inputs:
            _bind(step.binding, name, array)
        for name, value, output in self._cache_values(first_row, rows):
            _bind(step.binding, name, value, output)
        _bind(step.binding, LOGITS, step.logits, output=True)
        if new <= KEPT_STEP_TOKENS:
            self._steps[key] = step
            if len(self._steps) > KEPT_STEPS:
                self._steps.popitem(last=False)
        return step

    def _cache_values(self, first_row: int, rows: int) -> list[tuple[str, object, bool]]:
        """(name, OrtValue over the cache of rows first_row.., whether an output) for each past and present
        input: made once for a run of rows, bound by every width's step over it."""
        key = (first_row, rows)
        if key not in self._cached_values:
            from onnxruntime import OrtValue

            rows_of = [layer[first_row:first_row + rows] for layer in self.cache.reshape(-1, *self.cache.shape[2:])]
            self._cached_values[key] = [(name, OrtValue.ortvalue_from_numpy(view), output)
                                        for names, output in ((self.past_names, False), (self.present_names, True))
                                        for name, view in zip(names, rows_of)]
        return self._cached_values[key]

    def move_row(self, source: int, target: int, length: int) -> None:
        self.cache[:, :, target, :, :length] = self.cache[:, :, source, :, :length]


@dataclass
class _Step:
    """An IOBinding and the arrays bound to it (they must outlive it)."""

    binding: object
    ids: np.ndarray
    positions: np.ndarray
    seqlens: np.ndarray
    total: np.ndarray
    logits: np.ndarray
    query_lengths: np.ndarray | None = None
    kept_positions: np.ndarray | None = None
