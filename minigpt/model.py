"""MiniGPT: a decoder-only transformer over characters.

Token and learned position embeddings, `num_layers` pre-LayerNorm blocks
(causal multi-head self-attention, then a GELU MLP, each added back onto the
residual stream), a final LayerNorm and an LM head tied to the token embedding.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.config import GPTConfig
from minigpt.kv_cache import KVCache, LayerCache, Positions
from minigpt.kernels import causal_attention


def dropout_layer(p: float) -> nn.Module:
    # nn.Dropout(0) still dispatches an op every call, a tenth of a decode step at these sizes.
    return nn.Dropout(p) if p > 0 else nn.Identity()


class CausalSelfAttention(nn.Module):
    """Every position mixes the values of itself and the positions before it."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)
        self.resid_dropout = dropout_layer(config.dropout)
        self.attention_backend = "auto"  # which kernels compute it: minigpt.kernels.backends.use_attention_backend

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, E) -> (3, B, H, T, D) queries, keys and values: each head attends in its own subspace."""
        batch, seq, embed = x.shape
        return self.qkv(x).view(batch, seq, 3, self.num_heads, embed // self.num_heads).permute(2, 0, 3, 1, 4)

    def forward(self, x: torch.Tensor, where: Positions, cache: LayerCache | None = None) -> torch.Tensor:
        qkv = self.heads(x)
        q, kv = qkv[0], qkv[1:]
        if cache is not None:  # attend to every earlier position, not only this call's
            kv = cache.update(kv, where)
        y = causal_attention(q, *kv, key_lengths=where.key_lengths, backend=self.attention_backend)
        y = y.transpose(1, 2).reshape(x.shape)  # heads side by side again
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.embed_dim
        self.fc = nn.Linear(config.embed_dim, hidden)
        self.proj = nn.Linear(hidden, config.embed_dim)
        self.dropout = dropout_layer(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's tanh form of GELU: the same curve to ~1e-3, and three times
        # cheaper than the exact erf form, which shows in one-token decode steps.
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm: normalise the input of each sublayer, keep the residual path clean."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.embed_dim)
        self.attn = CausalSelfAttention(config)
        self.ln_mlp = nn.LayerNorm(config.embed_dim)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, where: Positions, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), where, cache)
        return x + self.mlp(self.ln_mlp(x))


class MiniGPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.embed_dim)
        self.pos_emb = nn.Embedding(config.block_size, config.embed_dim)
        self.dropout = dropout_layer(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_final = nn.LayerNorm(config.embed_dim)
        self.lm_head = nn.Linear(config.embed_dim, config.vocab_size, bias=False)
        # Reading a character and predicting it share one table: fewer
        # parameters, and rare characters learn from both directions.
        self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream so
        # its variance does not grow with depth.
        residual_std = 0.02 / math.sqrt(2 * config.num_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied head counts once

    def make_cache(self, batch_size: int) -> KVCache:  # in the model's dtype and on its device
        weight = self.tok_emb.weight
        return KVCache.empty(self.config, batch_size, weight.dtype, weight.device)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                start_pos: np.ndarray | None = None, cache: KVCache | None = None, last_only: bool = False):
        """(B, T) ids -> (logits (B, T, V), the mean next-token cross-entropy in nats with targets, else None).
        Row b's ids sit at positions start_pos[b] onwards (0 without it); with a cache (`make_cache`) they
        attend to the keys and values it holds at the row's earlier positions, and theirs are written there.
        last_only: the logits of the last position alone, (B, 1, V): a prefill needs no more."""
        where = Positions(idx.shape[1], start_pos, idx.device)
        if where.end > self.config.block_size:
            raise ValueError(f"positions up to {where.end} exceed block_size {self.config.block_size}")
        if cache is None and where.end != idx.shape[1]:
            raise ValueError("ids past position 0 attend to earlier positions: pass the cache that holds them")
        x = self.dropout(self.tok_emb(idx) + where.embed(self.pos_emb))
        layers = cache.layers if cache is not None else [None] * len(self.blocks)
        for block, layer_cache in zip(self.blocks, layers):
            x = block(x, where, layer_cache)
        logits = self.lm_head(self.ln_final(x[:, -1:] if last_only else x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss
