"""Attention kernels behind one entry point, `causal_attention`.

Installed as `minigpt.kernels`.
"""

from minigpt.kernels.attention import causal_attention

__all__ = ["causal_attention"]
