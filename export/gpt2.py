"""MiniGPT is GPT-2 shaped: the same tensors under transformers' `GPT2LMHeadModel` names, both ways.

Token and learned position embeddings, pre-LayerNorm blocks with one QKV
projection, tanh GELU ("gelu_new"), LayerNorm eps 1e-5 and a tied head. GPT-2
keeps its projections in Conv1D layout (in, out), the transpose of
`nn.Linear`'s (out, in). Logits of the two agree within ~4e-7.

This module needs neither torch nor transformers: it renames and transposes
whatever array type it is given.
"""

from __future__ import annotations

from minigpt.config import GPTConfig

LINEAR_NAMES = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc",
                "mlp.proj": "mlp.c_proj"}
NORM_NAMES = {"ln_attn": "ln_1", "ln_mlp": "ln_2"}
TOP_NAMES = {"tok_emb": "wte", "pos_emb": "wpe", "ln_final": "ln_f"}


def gpt2_config(config: GPTConfig) -> dict:
    """`transformers.GPT2Config` keyword arguments for a MiniGPT config."""
    return dict(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.embed_dim,
                n_layer=config.num_layers, n_head=config.num_heads, n_inner=config.mlp_ratio * config.embed_dim,
                activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)


def gpt2_state_dict(state: dict) -> dict:
    """MiniGPT state_dict (name -> array) -> GPT2LMHeadModel state_dict."""
    out = {"lm_head.weight": state["tok_emb.weight"]}
    for name, array in state.items():
        head, rest = name.split(".", 1)
        if head in TOP_NAMES:
            out[f"transformer.{TOP_NAMES[head]}.{rest}"] = array
        elif head == "blocks":
            layer, rest = rest.split(".", 1)
            module, kind = rest.rsplit(".", 1)
            if module in LINEAR_NAMES:
                target, array = LINEAR_NAMES[module], (array.T if kind == "weight" else array)
            else:
                target = NORM_NAMES[module]
            out[f"transformer.h.{layer}.{target}.{kind}"] = array
    return out


def minigpt_config_fields(hf_config: dict) -> dict:
    """GPTConfig fields from a GPT-2 `config.json`; raises ValueError naming what does not fit MiniGPT."""
    problems = []
    if hf_config.get("model_type") != "gpt2":
        problems.append(f"model_type is {hf_config.get('model_type')!r}, not 'gpt2'")
    if hf_config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation {hf_config.get('activation_function')!r} is not the tanh GELU")
    if abs(hf_config.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        problems.append(f"layer_norm_epsilon {hf_config.get('layer_norm_epsilon')} is not 1e-5")
    if hf_config.get("tie_word_embeddings", True) is False:
        problems.append("its LM head is not tied to the token embedding")
    embed = hf_config.get("n_embd", 0)
    inner = hf_config.get("n_inner") or 4 * embed
    if not embed or inner % embed:
        problems.append(f"n_inner {inner} is not a multiple of n_embd {embed}")
    if problems:
        raise ValueError("; ".join(problems))
    return dict(vocab_size=hf_config["vocab_size"], block_size=hf_config["n_positions"], embed_dim=embed,
                num_heads=hf_config["n_head"], num_layers=hf_config["n_layer"], mlp_ratio=inner // embed)


def minigpt_state_dict(state: dict) -> dict:
    """GPT2LMHeadModel state_dict -> MiniGPT state_dict (the inverse of `gpt2_state_dict`; the tied head left out).

    Names it does not know pass through unchanged, so the loader can report them as unexpected.
    """
    top = {gpt2: ours for ours, gpt2 in TOP_NAMES.items()}
    blocks = {gpt2: ours for ours, gpt2 in {**LINEAR_NAMES, **NORM_NAMES}.items()}
    out = {}
    for name, array in state.items():
        head, rest = name.removeprefix("transformer.").split(".", 1)
        if head in top:
            out[f"{top[head]}.{rest}"] = array
        elif head == "h" and rest.split(".", 1)[1].rsplit(".", 1)[0] in blocks:
            layer, rest = rest.split(".", 1)
            module, kind = rest.rsplit(".", 1)
            transpose = kind == "weight" and module in LINEAR_NAMES.values()
            out[f"blocks.{layer}.{blocks[module]}.{kind}"] = array.T if transpose else array
        elif name != "lm_head.weight":
            out[name] = array
    return out
