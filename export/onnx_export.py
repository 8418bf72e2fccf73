"""Export a MiniGPT checkpoint to one ONNX graph whose KV-cache onnxruntime updates in place.

`minigpt.export.onnx_graph` lays the weights out as onnxruntime's fused
operators (20 nodes for the default model); this module writes the file,
verified against PyTorch first, and optionally quantised to int8.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minigpt.checkpoint import atomic_write_bytes, load_checkpoint
from minigpt.decoding import generate_rows
from minigpt.errors import MiniGPTError
from minigpt.export.onnx_engine import OnnxEngine, graph_metadata
from minigpt.export.onnx_graph import DEFAULT_OPSET, MIN_OPSET, build_graph
from minigpt.generation import KVCacheEngine
from minigpt.model import MiniGPT
from minigpt.paths import check_output_file, check_replaceable
from minigpt.sampling import Sampler

LOGIT_TOLERANCE = 1e-4
VERIFY_NEW_TOKENS = 100


def to_onnx_bytes(model: MiniGPT, opset: int = DEFAULT_OPSET) -> bytes:
    """Serialize `model` as one graph for prefill and decode (metadata added by the caller)."""
    weights = {name: tensor.detach().float().cpu().numpy() for name, tensor in model.state_dict().items()}
    return build_graph(weights, model.config, opset).SerializeToString()


@contextlib.contextmanager
def quiet():
    """Hold back the exporter's and quantizer's progress prints, warnings and log lines."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def with_metadata(onnx_bytes: bytes, metadata: dict[str, str]) -> bytes:
    import onnx

    proto = onnx.load_from_string(onnx_bytes)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def quantize_int8(onnx_bytes: bytes) -> bytes:
    """onnxruntime dynamic quantisation: int8 weights, activations quantised on the fly."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        fp32, int8 = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        fp32.write_bytes(onnx_bytes)
        with quiet():
            # The MatMuls hold the weights; the com.microsoft operators around them are
            # opaque to ONNX shape inference, hence the default tensor type.
            quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        return int8.read_bytes()


@dataclass
class ExportReport:
    path: Path
    size_bytes: int
    form: str  # what was written: "opset 17", "a transformers GPT-2 directory"
    seconds: float
    lines: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        head = f"exported {self.path} ({self.size_bytes / 1e6:.2f} MB, {self.form}) in {self.seconds:.1f} s"
        return "\n".join([head, *self.lines])


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike = "minigpt.onnx", *,
                opset: int = DEFAULT_OPSET, quantize: str | None = None, verify: bool = True,
                force: bool = False) -> ExportReport:
    """Write `checkpoint` as an ONNX graph at `out`, verified against PyTorch unless verify=False.

    Nothing is written unless export (and verification) succeed; an existing
    `out` is replaced only with force=True.
    """
    out = Path(out)
    if quantize not in (None, "int8"):
        raise MiniGPTError(f"--quantize takes int8, got {quantize!r}")
    if opset < MIN_OPSET:
        raise MiniGPTError(f"--opset must be at least {MIN_OPSET} for this exporter, got {opset}")
    import onnx

    if opset > onnx.defs.onnx_opset_version():
        raise MiniGPTError(f"--opset {opset} is newer than this onnx {onnx.__version__} knows (up to "
                           f"{onnx.defs.onnx_opset_version()}); choose from {MIN_OPSET} to that "
                           f"(default {DEFAULT_OPSET})")
    check_output_file(out)
    check_replaceable(out, writes="onnx", force=force, inputs=[("--checkpoint", checkpoint)])
    loaded = load_checkpoint(checkpoint)
    start = time.perf_counter()
    metadata = graph_metadata(loaded.model.config, loaded.tokenizer)
    draft = loaded.ngram_draft()
    if draft is not None:  # the .onnx file speculates on its own too
        from minigpt.drafts import NGRAM_META

        metadata[NGRAM_META] = draft.metadata()
    fp32 = with_metadata(to_onnx_bytes(loaded.model, opset), metadata)
    final = with_metadata(quantize_int8(fp32), metadata) if quantize else fp32
    report = ExportReport(out, len(final), f"opset {opset}", time.perf_counter() - start, [node_summary(final)])
    if verify:
        report.lines += verify_graph(loaded.model, fp32, final if quantize else None)
    atomic_write_bytes(out, final)
    return report


def node_summary(onnx_bytes: bytes) -> str:
    """'graph: 20 nodes (9 MatMul, ...)': a decode step costs a few microseconds a node, so the count is speed."""
    import onnx

    counts = Counter(node.op_type for node in onnx.load_from_string(onnx_bytes).graph.node)
    kinds = ", ".join(f"{count} {op}" for op, count in counts.most_common())
    return f"graph: {sum(counts.values())} nodes ({kinds})"


def verify_graph(model: MiniGPT, fp32: bytes, int8: bytes | None = None) -> list[str]:
    """Check the graph, then hold onnxruntime to PyTorch: logits, and greedy tokens for 100 steps."""
    import onnx

    onnx.checker.check_model(onnx.load_from_string(fp32), full_check=True)
    lines = ["onnx.checker: ok"]
    engine = OnnxEngine(fp32)
    worst = max_logit_difference(model, engine)
    lines.append(f"logits vs PyTorch: max |delta| {worst:.2e} over prefill and decode, batch 1 and 3 "
                 f"(limit {LOGIT_TOLERANCE:.0e})")
    if not worst <= LOGIT_TOLERANCE:
        raise MiniGPTError(f"onnxruntime logits differ from PyTorch by {worst:.2e} (> {LOGIT_TOLERANCE:.0e}); "
                           "the export is wrong, nothing was written")
    prompt = list(np.random.default_rng(0).integers(0, model.config.vocab_size, size=8))
    reference, torch_rate = greedy_tokens(KVCacheEngine(model), prompt)
    ours, fp32_rate = greedy_tokens(engine, prompt)
    if ours != reference:
        raise MiniGPTError("onnxruntime's greedy tokens differ from PyTorch's; the export is wrong, "
                           "nothing was written")
    lines.append(f"greedy {VERIFY_NEW_TOKENS} new tokens: identical to the PyTorch KV-cache engine "
                 f"({fp32_rate:,.0f} vs {torch_rate:,.0f} tokens/s)")
    if int8 is not None:
        quantized, int8_rate = greedy_tokens(OnnxEngine(int8), prompt)
        agree = sum(a == b for a, b in zip(quantized, reference))
        lines.append(f"int8: {len(int8) / 1e6:.2f} MB (fp32 {len(fp32) / 1e6:.2f} MB), {int8_rate:,.0f} tokens/s "
                     f"(fp32 {fp32_rate:,.0f}), greedy tokens agree with fp32 on {agree}/{VERIFY_NEW_TOKENS}")
    return lines


@torch.inference_mode()
def max_logit_difference(model: MiniGPT, engine: OnnxEngine) -> float:
    """Largest |logit difference| over prefill and decode steps, batch 1 and 3, random ids."""
    rng = np.random.default_rng(0)
    config = model.config
    worst = 0.0
    for batch in (1, 3):
        length = max(1, min(config.block_size - 4, 9))
        steps = min(4, config.block_size - length)
        ids = rng.integers(0, config.vocab_size, size=(batch, length + steps))
        torch_engine = KVCacheEngine(model)
        torch_engine.start(batch)
        engine.start(batch)
        at_zero = np.zeros(batch, dtype=np.int64)
        prefilled = torch_engine.extend(ids[:, :length], at_zero)
        pairs = [(prefilled, engine.extend(ids[:, :length], at_zero).copy()),  # every position's logits, and the last's
                 (prefilled[:, -1:], engine.extend(ids[:, :length], at_zero, last_only=True).copy())]
        for t in range(length, length + steps):
            step = ids[:, t:t + 1]
            pairs.append((torch_engine.extend(step, at_zero + t), engine.extend(step, at_zero + t).copy()))
        worst = max(worst, *(float(np.abs(a - b).max()) for a, b in pairs))
    return worst


def greedy_tokens(engine, prompt: list[int]) -> tuple[list[int], float]:
    start = time.perf_counter()
    tokens = [int(ids[0]) for ids in generate_rows(engine, [prompt], VERIFY_NEW_TOKENS, Sampler(temperature=0))]
    return tokens, VERIFY_NEW_TOKENS / (time.perf_counter() - start)
