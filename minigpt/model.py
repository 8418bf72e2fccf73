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
from minigpt.kernels import causal_attention
from minigpt.kernels.attention import attention_weights, check_backend


def dropout_layer(p: float) -> nn.Module:
    # nn.Dropout(0) still dispatches an op on every call, a tenth of a decode
    # step at these sizes; Identity costs only the call.
    return nn.Dropout(p) if p > 0 else nn.Identity()


class KVCache:
    """Every layer's keys and values for a batch of rows, preallocated for block_size positions.

    kv is (layers, 2, batch, heads, block_size, head_dim); `lengths` (host
    numpy) says how many positions each row holds, so rows may sit at
    different lengths (a ragged batch). New entries are written in place and
    attention reads a view of the filled prefix: a decode step allocates no
    cache and copies only the new token. Keys and values sit side by side, so
    one copy stores both.
    """

    def __init__(self, kv: torch.Tensor, lengths: np.ndarray):
        self.kv, self.lengths = kv, lengths
        self.layers = kv.unbind(0)  # views, made once: indexing kv every step costs more than the copy

    @classmethod
    def empty(cls, config: GPTConfig, batch_size: int, dtype: torch.dtype, device: torch.device) -> "KVCache":
        kv = torch.zeros((config.num_layers, 2, batch_size, config.num_heads, config.block_size, config.head_dim),
                         dtype=dtype, device=device)
        return cls(kv, np.zeros(batch_size, dtype=np.int64))

    @property
    def batch_size(self) -> int:
        return self.kv.shape[2]

    def rows(self, first: int, count: int) -> "KVCache":
        """Rows first .. first+count-1 as a cache of their own (a view: writes land here)."""
        if first == 0 and count == self.batch_size:
            return self
        return KVCache(self.kv.narrow(2, first, count), self.lengths[first:first + count])

    def step(self, seq: int) -> "CacheStep":
        return CacheStep(self, seq)


class CacheStep:
    """One forward pass's view of a KVCache: where each row writes its `seq` new positions.

    When every row starts at the same position (always in training-style
    prefill, and in batches that started together) the writes are one slice
    copy and attention needs no mask; otherwise each row writes at its own
    position and attention is told each row's length.
    """

    def __init__(self, cache: KVCache, seq: int):
        self.cache, self.seq = cache, seq
        lengths = cache.lengths
        first = int(lengths[0])
        shared = len(lengths) == 1 or bool((lengths == first).all())
        self.start = first if shared else None  # the shared start, if there is one
        self.end = (first if shared else int(lengths.max())) + seq  # keys attention reads: 0 .. end-1
        # Only for ragged rows: each row's positions (B, T), its key count after this step, and
        # the scatter index that writes its keys and values there.
        self.positions = self.key_lengths = self.write_index = None
        if self.start is None:
            starts = torch.from_numpy(cache.lengths).to(cache.kv.device)
            self.positions = starts[:, None] + torch.arange(seq, device=starts.device)
            self.key_lengths = starts + seq
            _, _, batch, heads, _, head_dim = cache.kv.shape
            self.write_index = self.positions.view(1, batch, 1, seq, 1).expand(2, batch, heads, seq, head_dim)

    def update(self, layer: int, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store kv (2, B, H, T, D) at each row's next positions; return keys and values 0 .. end-1."""
        cache = self.cache.layers[layer]
        if self.start is not None:
            cache.narrow(3, self.start, self.seq).copy_(kv)
        else:
            cache.scatter_(3, self.write_index, kv)
        return cache.narrow(3, 0, self.end).unbind(0)

    def finish(self) -> None:
        self.cache.lengths += self.seq


class CausalSelfAttention(nn.Module):
    """Every position mixes the values of itself and the positions before it."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)
        self.resid_dropout = dropout_layer(config.dropout)
        self.attention_backend = "auto"  # see minigpt.kernels.causal_attention
        self.keep_weights = False  # set by MiniGPT.attention_maps
        self.weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, step: CacheStep | None = None, layer: int = 0) -> torch.Tensor:
        batch, seq, embed = x.shape
        # (B, T, 3E) -> (3, B, H, T, D): each head attends in its own subspace.
        qkv = self.qkv(x).view(batch, seq, 3, self.num_heads, embed // self.num_heads).permute(2, 0, 3, 1, 4)
        q, kv = qkv[0], qkv[1:]
        key_lengths = None
        if step is not None:  # attend to every earlier position, not only this call's
            kv, key_lengths = step.update(layer, kv), step.key_lengths
        k, v = kv
        if self.keep_weights:  # attention written out, so the weights that made y can be shown
            self.weights = attention_weights(q, k, key_lengths)
            y = self.weights @ v
        else:
            y = causal_attention(q, k, v, key_lengths=key_lengths, backend=self.attention_backend)
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

    def forward(self, x: torch.Tensor, step: CacheStep | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), step, layer)
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

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> torch.Tensor:
        """Every layer's attention weights for (B, T) ids: (layers, B, heads, T, T), row i of a map the
        distribution query i spreads over positions 0 .. i. The forward pass is this model's own, with each
        layer's attention written out (`minigpt.kernels.attention_weights`) instead of fused."""
        for block in self.blocks:
            block.attn.keep_weights = True
        try:
            self(idx)
            return torch.stack([block.attn.weights for block in self.blocks])
        finally:
            for block in self.blocks:
                block.attn.keep_weights, block.attn.weights = False, None

    def make_cache(self, batch_size: int) -> KVCache:
        """An empty KVCache for `batch_size` rows, in the model's dtype and on its device."""
        weight = self.tok_emb.weight
        return KVCache.empty(self.config, batch_size, weight.dtype, weight.device)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache: KVCache | None = None):
        """idx: (B, T) token ids. Returns (logits (B, T, V), loss or None).

        Without a cache every row starts at position 0. With one (from
        `make_cache`), row b's ids sit at positions cache.lengths[b] onwards:
        they attend to the keys and values the cache holds for that row, and
        theirs are added to it. Prefill passes an empty cache (or rows of one)
        and the prompt; decode passes one new token per row.
        With targets (B, T), the loss is the mean next-token cross-entropy in nats.
        """
        seq = idx.shape[1]
        step = cache.step(seq) if cache is not None else None
        end = step.end if step is not None else seq
        if end > self.config.block_size:
            raise ValueError(f"positions up to {end} exceed block_size {self.config.block_size}")
        if step is None or step.start is not None:
            # A slice of the table, not a lookup: no index tensor to build each step.
            start = step.start if step is not None else 0
            positions = self.pos_emb.weight[start:start + seq]
        else:
            positions = self.pos_emb(step.positions)
        x = self.dropout(self.tok_emb(idx) + positions)
        for layer, block in enumerate(self.blocks):
            x = block(x, step, layer)
        if step is not None:
            step.finish()
        logits = self.lm_head(self.ln_final(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss
