"""The one transformer block every model family uses: pre-norm attention + MLP with residuals.
The attention, MLP and norm are injected (timm/DiT style), so ViT, DiT and the decoder share it."""
from __future__ import annotations

from typing import Optional

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


class Block(nn.Module):
    def __init__(self, attn: MoHAttention, mlp: nn.Module, norm1: nn.Module, norm2: nn.Module, drop_path: float = 0.0):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        x: Tensor,
        attention_mask: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
        positions: Optional[Tensor] = None,
    ) -> tuple[Tensor, Routing]:
        a = self.attn(self.norm1(x), attention_mask, cache, positions)
        x = x + self.drop_path(a.output)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, a.routing
