"""MiniGPT: a decoder-only transformer over characters.

Token and learned position embeddings, `num_layers` pre-LayerNorm blocks
(causal multi-head self-attention, then a GELU MLP, each added back onto the
residual stream), a final LayerNorm and an LM head tied to the token embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.config import GPTConfig
from minigpt.kernels import causal_attention
from minigpt.kernels.attention import check_backend


def dropout_layer(p: float) -> nn.Module:
    # nn.Dropout(0) still dispatches an op on every call, a tenth of a decode
    # step at these sizes; Identity costs only the call.
    return nn.Dropout(p) if p > 0 else nn.Identity()


class KVCache:
    """One layer's keys and values, preallocated for block_size positions.

    New entries are written in place and attention reads a view of the filled
    prefix, so a decode step allocates nothing and copies only the new token.
    Keys and values sit side by side in one tensor, so one copy stores both.
    """

    def __init__(self, batch_size: int, config: GPTConfig, dtype: torch.dtype, device: torch.device):
        self.batch_size = batch_size
        self.kv = torch.zeros((2, batch_size, config.num_heads, config.block_size, config.head_dim),
                              dtype=dtype, device=device)

    def update(self, start: int, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store kv (2, B, H, T, D) at positions start .. start+T-1; return keys and values 0 .. start+T-1."""
        self.kv.narrow(3, start, kv.shape[3]).copy_(kv)
        return self.kv.narrow(3, 0, start + kv.shape[3]).unbind(0)


class GraphKVCache:
    """The cache as an exported graph sees it: past keys and values in, present ones out.

    A graph keeps no state between runs, so the past keys and values arrive
    as inputs (B, H, P, D) and the present ones (B, H, P+T, D) leave as outputs.
    """

    def __init__(self, past_keys: torch.Tensor, past_values: torch.Tensor):
        self.past_keys, self.past_values = past_keys, past_values
        self.present: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, start: int, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = kv.unbind(0)
        self.present = (torch.cat([self.past_keys, keys], dim=2), torch.cat([self.past_values, values], dim=2))
        return self.present


class CausalSelfAttention(nn.Module):
    """Every position mixes the values of itself and the positions before it."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)
        self.resid_dropout = dropout_layer(config.dropout)
        self.attention_backend = "auto"  # see minigpt.kernels.causal_attention

    def forward(self, x: torch.Tensor, cache: KVCache | GraphKVCache | None = None,
                start: int = 0) -> torch.Tensor:
        batch, seq, embed = x.shape
        # (B, T, 3E) -> (3, B, H, T, D): each head attends in its own subspace.
        qkv = self.qkv(x).view(batch, seq, 3, self.num_heads, embed // self.num_heads).permute(2, 0, 3, 1, 4)
        q, kv = qkv[0], qkv[1:]
        if cache is not None:  # attend to every earlier position, not only this call's
            kv = cache.update(start, kv)
        k, v = kv
        y = causal_attention(q, k, v, backend=self.attention_backend)
        y = y.transpose(1, 2).reshape(batch, seq, embed)  # heads side by side again
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

    def forward(self, x: torch.Tensor, cache: KVCache | GraphKVCache | None = None,
                start: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), cache, start)
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

    def set_attention_backend(self, backend: str) -> "MiniGPT":
        """Route every layer's attention through "auto", "torch" or "triton" kernels."""
        check_backend(backend, self.tok_emb.weight.device)
        for block in self.blocks:
            block.attn.attention_backend = backend
        return self

    def make_caches(self, batch_size: int) -> list[KVCache]:
        """One empty KVCache per layer, in the model's dtype and on its device."""
        weight = self.tok_emb.weight
        return [KVCache(batch_size, self.config, weight.dtype, weight.device) for _ in self.blocks]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                caches: list[KVCache] | list[GraphKVCache] | None = None, start: int = 0):
        """idx: (B, T) token ids at positions start .. start+T-1. Returns (logits (B, T, V), loss or None).

        Without caches the sequence starts at position 0. With caches (from
        `make_caches`), positions 0 .. start-1 are read from them and this
        call's keys and values are added: prefill passes start=0 and the
        prompt, decode passes the position of one new token.
        With targets (B, T), the loss is the mean next-token cross-entropy in nats.
        """
        seq = idx.shape[1]
        if start + seq > self.config.block_size:
            raise ValueError(f"positions up to {start + seq} exceed block_size {self.config.block_size}")
        # A slice of the table, not a lookup: no index tensor to build each step.
        x = self.dropout(self.tok_emb(idx) + self.pos_emb.weight[start:start + seq])
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches is not None else None, start)
        logits = self.lm_head(self.ln_final(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss
