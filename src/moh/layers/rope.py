"""Rotary position embedding (RoPE), half-split ("rotate_half") convention as in LLaMA / HF."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """cos/sin of ``positions * inv_freq``. ``inv_freq`` (hd/2,) and ``attention_scaling`` (a
    factor on cos and sin) may be given instead of ``theta``: the scaled RoPE variants of
    transformers' ``ROPE_INIT_FUNCTIONS`` (linear, llama3, yarn) return both."""

    def __init__(self, head_dim: int, theta: float = 10000.0, inv_freq: Tensor | None = None,
                 attention_scaling: float = 1.0):
        super().__init__()
        if inv_freq is None:
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        elif tuple(inv_freq.shape) != (head_dim // 2,):
            raise ValueError(f"inv_freq has shape {tuple(inv_freq.shape)}, expected ({head_dim // 2},)")
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = float(attention_scaling)

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions (...,) integer -> cos, sin of shape (..., head_dim)."""
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # (..., hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., hd) with cos/sin broadcastable to it."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
