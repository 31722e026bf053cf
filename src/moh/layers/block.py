"""The one transformer block every model family uses: pre-norm attention + MLP with residuals.
The attention, MLP and norm are injected (timm/DiT style), so ViT, DiT and the decoder share it.
A conditioned block (DiT's adaLN-Zero) is the same block with a ``modulation`` injected: it maps
the conditioning vector to a shift, scale and gate per branch."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from moh.core.attention import MoHAttention
from moh.core.cache import KVCache
from moh.core.routing import Routing


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class AdaLNModulation(nn.Module):
    """adaLN-Zero (DiT, Peebles & Xie 2023): cond (B, C) -> (shift, scale, gate) for the attention
    and the MLP branch, each (B, 1, D). Zero-initialised, so every gate starts at 0 and the block
    starts as the identity."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.proj = nn.Linear(cond_dim, 6 * dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, cond_BC: Tensor) -> tuple[Tensor, ...]:
        return self.proj(F.silu(cond_BC)).unsqueeze(1).chunk(6, dim=-1)


def modulate(x_BTD: Tensor, shift_B1D: Tensor, scale_B1D: Tensor) -> Tensor:
    return x_BTD * (1 + scale_B1D) + shift_B1D


class Block(nn.Module):
    def __init__(self, attn: MoHAttention, mlp: nn.Module, norm1: nn.Module, norm2: nn.Module, drop_path: float = 0.0,
                 modulation: Optional[nn.Module] = None):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp
        self.drop_path = DropPath(drop_path)
        self.modulation = modulation  # None: a plain pre-norm block; else cond -> 6 x (B, 1, D)

    def forward(
        self,
        x: Tensor,
        attention_mask: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
        positions: Optional[Tensor] = None,
        cond: Optional[Tensor] = None,
    ) -> tuple[Tensor, Routing]:
        """x (B, T, D); ``cond`` (B, C): the conditioning vector of a modulated block (required
        there, refused elsewhere)."""
        if (cond is None) != (self.modulation is None):
            raise ValueError("a block with a modulation needs cond, a block without one takes none"
                             f" (modulation={type(self.modulation).__name__}, cond given: {cond is not None})")
        if self.modulation is None:
            a = self.attn(self.norm1(x), attention_mask, cache, positions)
            x = x + self.drop_path(a.output)
            return x + self.drop_path(self.mlp(self.norm2(x))), a.routing
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)
        a = self.attn(modulate(self.norm1(x), shift1, scale1), attention_mask, cache, positions)
        x = x + self.drop_path(gate1 * a.output)
        return x + self.drop_path(gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))), a.routing
