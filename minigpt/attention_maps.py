"""What the model attends to: every layer's attention weights for a prompt, for pictures and the playground.

The kernels never hold the attention matrix. Here each attention layer's
input is caught on its way in (a forward pre-hook), and the layer's own
queries and keys give the matrix written out (`attention_weights`, the
definition the kernels are tested against) during the model's own forward
pass.
"""

from __future__ import annotations

import torch

from minigpt.kernels.attention import attention_weights


@torch.no_grad()
def attention_maps(model, ids: torch.Tensor) -> torch.Tensor:
    """(layers, B, heads, T, T) weights for (B, T) ids of a `MiniGPT`: row i of a map is the distribution
    query i spreads over positions 0 .. i."""
    maps = []

    def keep(attention, inputs):
        q, k, _ = attention.heads(inputs[0])
        maps.append(attention_weights(q, k))

    hooks = [block.attn.register_forward_pre_hook(keep) for block in model.blocks]
    try:
        model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(maps)
