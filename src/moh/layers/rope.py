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
        self._signature: tuple | None = None  # (inv_freq's storage, its values, scaling): see cos_sin

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions (...,) integer -> cos, sin of shape (..., head_dim).

        The last result is kept (one entry, module-wide): every layer of a model gets the same
        ``positions`` tensor in one forward, so the factors are made once per forward, not once per
        layer (a decode step of a 30-layer model otherwise spends 6 of its operations per layer
        here). Reused only for the very same, unmodified positions tensor (identity and version),
        the same dtype and equal frequencies; never while compiling."""
        if torch.compiler.is_compiling():
            return self._cos_sin(positions, dtype)
        inv = self.inv_freq
        if self._signature is None or self._signature[0] != (inv.data_ptr(), inv.device, _version(inv)):
            # what the factors depend on besides the positions (read again after a move or a load):
            # layers built alike share their factors
            self._signature = ((inv.data_ptr(), inv.device, _version(inv)), tuple(inv.tolist()), self.attention_scaling)
        key = (self._signature[1:], dtype, _version(positions))
        last = _LAST.get("entry")
        if last is not None and last[0] is positions and last[1] == key:
            return last[2]
        out = self._cos_sin(positions, dtype)
        _LAST["entry"] = (positions, key, out)  # holds the positions: their id cannot be reused meanwhile
        return out

    def _cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # (..., hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


_LAST: dict = {}  # RotaryEmbedding.cos_sin's last result


def _version(t: Tensor) -> int | None:
    """In-place changes of ``t`` so far (None for inference tensors, which keep no count)."""
    return None if t.is_inference() else t._version


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., hd) with cos/sin broadcastable to it."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
