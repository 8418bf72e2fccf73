"""MiniGPT's weights laid out as a lean ONNX decoding graph, with the KV-cache updated in place.

This is a converter, as CTranslate2 has one: it walks the model's modules in
order and emits, for each, the onnxruntime operator that does its job in one
node. `verify_graph` in `onnx_export` then holds the result to PyTorch (logits
and greedy tokens) before anything is written, so the two cannot drift apart.

One block becomes eleven nodes:

    Sum, LayerNormalization   the residual stream + the last block's output + its bias, ln_attn
    MatMul, Add               the QKV projection
    GroupQueryAttention       writes this step's keys/values into the cache, attends
    MatMul                    attention output projection
    Sum, LayerNormalization   the residual stream + the projection + its bias, ln_mlp
    MatMul, FastGelu          fc, its bias and the tanh GELU in one node
    MatMul                    MLP output projection (its bias joins the next block's Sum)

The embeddings are two Gathers whose Sum is block 0's residual stream; after
the last block come ln_final, the same way, and the tied head. Only the
positions in `logit_positions` go on past the last block's attention (two
Gathers): the other positions' keys and values are in the cache by then,
and their logits are what a prefill throws away (it needs the last
position's; nanoGPT's `generate` keeps only that one too).
The residual sums and LayerNorms are standard operators, not the fused
SkipLayerNormalization / EmbedLayerNormalization (com.microsoft): onnxruntime's
CPU kernels for those work a row at a time, which made a whole call of 4 to
40 tokens 4-15% slower, at the price of ~5% on a one-token call (its seven
more nodes; bench/README.md, "The graph's operators").

Why GroupQueryAttention (com.microsoft): given the same buffer as past and
present (bound through IOBinding), it writes the new positions into that
buffer and attends over each row's own length (`seqlens_k`), so a decode step
allocates no cache and copies only the new token, and rows of a batch may sit
at different lengths. With `query_seqlens` (each row's count of new tokens)
it appends several tokens after each row's past in one call: speculative
decoding verifies a whole batch's guesses at once. The standard opset-23
`Attention` returns `Concat(past, new)`, a copy of the whole cache every
step; MultiHeadAttention shares buffers only on CUDA. No mask is built in the
graph at all.

Graph inputs: `input_ids` (batch, seq) int32, `position_ids` (batch, seq)
int32, `seqlens_k` (batch,) int32 (each row's total length after this run,
minus one), `total_sequence_length` () int32, `query_seqlens` (batch,) int32
(each row's new tokens: all of seq), `logit_positions` (kept,) int64 (which
of the seq positions to return logits for), and `past.{i}.key/value`
(batch, heads, max_positions, head_dim_padded). Outputs: `logits`
(batch, kept, vocab) and `present.{i}.key/value`, the same buffers.

GroupQueryAttention wants a head size that is a multiple of 8: other head
sizes are padded with zero weights (zeros add nothing to q·k, and the padded
output columns meet zero rows of the projection), and the softmax scale keeps
the true head size.
"""

from __future__ import annotations

import math

import numpy as np

from minigpt.config import GPTConfig

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
SEQLENS_K = "seqlens_k"
TOTAL_LENGTH = "total_sequence_length"
QUERY_LENGTHS = "query_seqlens"
QUERY_LENGTHS_INPUT = 16  # GroupQueryAttention's input index for it (onnxruntime 1.32's schema)
LOGIT_POSITIONS = "logit_positions"
LOGITS = "logits"
MS_DOMAIN = "com.microsoft"
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which MiniGPT uses
DEFAULT_OPSET = 17
MIN_OPSET = 17  # LayerNormalization


def cache_names(prefix: str, num_layers: int) -> list[str]:
    """Graph names of every layer's keys and values, in graph order: prefix.0.key, prefix.0.value, ..."""
    return [f"{prefix}.{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]


def padded_head_dim(head_dim: int) -> int:
    return -(-head_dim // 8) * 8


def _pad_heads(weight: np.ndarray, heads: int, head_dim: int, axis: int) -> np.ndarray:
    """Zero-pad each head's slice of `axis` from head_dim to padded_head_dim(head_dim)."""
    padded = padded_head_dim(head_dim)
    if padded == head_dim:
        return weight
    shape = list(weight.shape)
    split = shape[:axis] + [-1, heads, head_dim] + shape[axis + 1:]  # -1: the q/k/v index, or 1
    grown = np.zeros(shape[:axis] + [shape[axis] // head_dim * padded] + shape[axis + 1:], weight.dtype)
    view = grown.reshape(shape[:axis] + [-1, heads, padded] + shape[axis + 1:])
    view[(slice(None),) * (axis + 2) + (slice(0, head_dim),)] = weight.reshape(split)
    return grown


def build_graph(weights: dict[str, np.ndarray], config: GPTConfig, opset: int = DEFAULT_OPSET):
    """An onnx.ModelProto for MiniGPT weights given as a name -> float32 array dict (its state_dict)."""
    from onnx import helper, numpy_helper

    heads, head_dim, layers = config.num_heads, config.head_dim, config.num_layers
    initializers, nodes = [], []

    def weight(name: str, array: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], domain: str = "", **attributes) -> None:
        nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(nodes)}", domain=domain, **attributes))

    def add_layer_norm(residual: str, branch: str, bias: str | None, norm: str, out: str, residual_out: str) -> None:
        """residual_out = residual + branch + bias; out = LayerNorm(residual_out)."""
        node("Sum", [residual, branch] + ([bias] if bias else []), [residual_out])
        node("LayerNormalization", [residual_out, weight(f"{norm}.weight", weights[f"{norm}.weight"]),
                                    weight(f"{norm}.bias", weights[f"{norm}.bias"])], [out],
             axis=-1, epsilon=LAYER_NORM_EPS)

    tok = weights["tok_emb.weight"]
    node("Gather", [weight("tok_emb.weight", tok), INPUT_IDS], ["token_embeddings"])
    node("Gather", [weight("pos_emb.weight", weights["pos_emb.weight"]), POSITION_IDS], ["position_embeddings"])
    residual, branch, branch_bias = "token_embeddings", "position_embeddings", None  # what block 0 adds up
    for i in range(layers):
        p = f"blocks.{i}"
        add_layer_norm(residual, branch, branch_bias, f"{p}.ln_attn", f"{p}.attn_in", f"{p}.residual_attn")
        qkv_weight = _pad_heads(weights[f"{p}.attn.qkv.weight"], heads, head_dim, axis=0).T
        qkv_bias = _pad_heads(weights[f"{p}.attn.qkv.bias"], heads, head_dim, axis=0)
        node("MatMul", [f"{p}.attn_in", weight(f"{p}.attn.qkv.weight", qkv_weight)], [f"{p}.qkv_nobias"])
        node("Add", [f"{p}.qkv_nobias", weight(f"{p}.attn.qkv.bias", qkv_bias)], [f"{p}.qkv"])
        attention_inputs = [f"{p}.qkv", "", "", f"past.{i}.key", f"past.{i}.value", SEQLENS_K, TOTAL_LENGTH]
        attention_inputs += [""] * (QUERY_LENGTHS_INPUT - len(attention_inputs)) + [QUERY_LENGTHS]
        node("GroupQueryAttention", attention_inputs,
             [f"{p}.attn_heads", f"present.{i}.key", f"present.{i}.value"], domain=MS_DOMAIN,
             num_heads=heads, kv_num_heads=heads, scale=1.0 / math.sqrt(head_dim))
        if i == layers - 1:  # the cache is written: only the positions whose logits are asked for go on
            for name in (f"{p}.attn_heads", f"{p}.residual_attn"):
                node("Gather", [name, LOGIT_POSITIONS], [f"{name}.kept"], axis=1)
            attention_out, residual_out = f"{p}.attn_heads.kept", f"{p}.residual_attn.kept"
        else:
            attention_out, residual_out = f"{p}.attn_heads", f"{p}.residual_attn"
        proj_weight = _pad_heads(weights[f"{p}.attn.proj.weight"], heads, head_dim, axis=1).T
        node("MatMul", [attention_out, weight(f"{p}.attn.proj.weight", proj_weight)], [f"{p}.attn_out"])
        add_layer_norm(residual_out, f"{p}.attn_out", weight(f"{p}.attn.proj.bias",
                       weights[f"{p}.attn.proj.bias"]), f"{p}.ln_mlp", f"{p}.mlp_in", f"{p}.residual_mlp")
        node("MatMul", [f"{p}.mlp_in", weight(f"{p}.mlp.fc.weight", weights[f"{p}.mlp.fc.weight"].T)], [f"{p}.fc"])
        node("FastGelu", [f"{p}.fc", weight(f"{p}.mlp.fc.bias", weights[f"{p}.mlp.fc.bias"])], [f"{p}.gelu"],
             domain=MS_DOMAIN)
        node("MatMul", [f"{p}.gelu", weight(f"{p}.mlp.proj.weight", weights[f"{p}.mlp.proj.weight"].T)],
             [f"{p}.mlp_out"])
        residual, branch = f"{p}.residual_mlp", f"{p}.mlp_out"
        branch_bias = weight(f"{p}.mlp.proj.bias", weights[f"{p}.mlp.proj.bias"])
    add_layer_norm(residual, branch, branch_bias, "ln_final", "final", "residual_final")
    node("MatMul", ["final", weight("lm_head.weight", tok.T)], [LOGITS])  # tied: the embedding, transposed

    graph = helper.make_graph(nodes, "minigpt", *_graph_io(config), initializers)
    return helper.make_model(graph, producer_name="minigpt",
                             opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)])


def _graph_io(config: GPTConfig) -> tuple[list, list]:
    """The graph's inputs and outputs: ids and positions of any (batch, seq), each layer's cache buffers."""
    from onnx import TensorProto, helper

    batch, seq = "batch", "seq"
    cache_shape = [batch, config.num_heads, config.block_size, padded_head_dim(config.head_dim)]
    inputs = [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT32, [batch, seq]),
              helper.make_tensor_value_info(POSITION_IDS, TensorProto.INT32, [batch, seq]),
              helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, [batch]),
              helper.make_tensor_value_info(TOTAL_LENGTH, TensorProto.INT32, []),
              helper.make_tensor_value_info(QUERY_LENGTHS, TensorProto.INT32, [batch]),
              helper.make_tensor_value_info(LOGIT_POSITIONS, TensorProto.INT64, ["kept"])]
    inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, cache_shape)
               for name in cache_names("past", config.num_layers)]
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [batch, "kept", config.vocab_size])]
    outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, cache_shape)
                for name in cache_names("present", config.num_layers)]
    return inputs, outputs
