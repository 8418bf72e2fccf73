"""MiniGPT is GPT-2 shaped: the same tensors under transformers' `GPT2LMHeadModel` names.

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


def gpt2_config(config: GPTConfig) -> dict:
    """`transformers.GPT2Config` keyword arguments for a MiniGPT config."""
    return dict(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.embed_dim,
                n_layer=config.num_layers, n_head=config.num_heads, n_inner=config.mlp_ratio * config.embed_dim,
                activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)


def gpt2_state_dict(state: dict) -> dict:
    """MiniGPT state_dict (name -> array) -> GPT2LMHeadModel state_dict."""
    out = {"transformer.wte.weight": state["tok_emb.weight"], "transformer.wpe.weight": state["pos_emb.weight"],
           "transformer.ln_f.weight": state["ln_final.weight"], "transformer.ln_f.bias": state["ln_final.bias"],
           "lm_head.weight": state["tok_emb.weight"]}
    for name, array in state.items():
        if not name.startswith("blocks."):
            continue
        _, layer, rest = name.split(".", 2)
        module, kind = rest.rsplit(".", 1)
        if module in LINEAR_NAMES:
            target, array = LINEAR_NAMES[module], (array.T if kind == "weight" else array)
        else:
            target = NORM_NAMES[module]
        out[f"transformer.h.{layer}.{target}.{kind}"] = array
    return out
