"""MoH-ViT: a plain vision transformer (patch embedding, pre-norm blocks, class token or mean
pooling) whose attention is MoHAttention. The MHA baseline is the same model with router "all".

The paper's MoH-ViT results use a TransNeXt backbone; this is a plain ViT at the paper's head
ratios, so its numbers are not the paper's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moh.config import MoHConfig
from moh.core.attention import MoHAttention
from moh.layers.block import Block
from moh.layers.embed import check_patch_grid
from moh.layers.mlp import MLP
from moh.models.base import HeadSpec, ModelOutput, finish_output
from moh.models.factory import MODELS


@dataclass
class ViTConfig(HeadSpec):
    image_size: int = 28
    patch_size: int = 4
    in_chans: int = 1
    num_classes: int = 10
    dim: int = 192
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    pool: str = "cls"  # "cls" or "mean"
    dropout: float = 0.0
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        check_patch_grid(self.image_size, self.patch_size)
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool={self.pool!r}; valid choices: ['cls', 'mean']")
        self.check_sizes("in_chans", "num_classes", "dim")

    def attention_configs(self) -> list[MoHConfig]:
        return self.layer_configs(self.dim, self.depth, qkv_bias=True, out_bias=True)

    def build(self) -> "ViT":
        return ViT(self)


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.patch_embed = nn.Conv2d(cfg.in_chans, D, cfg.patch_size, cfg.patch_size)
        n = (cfg.image_size // cfg.patch_size) ** 2 + (cfg.pool == "cls")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, n, D) * 0.02)
        self.drop = nn.Dropout(cfg.dropout)
        dpr = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(MoHAttention(a), MLP(D, int(D * cfg.mlp_ratio), cfg.dropout), nn.LayerNorm(D), nn.LayerNorm(D), p)
            for a, p in zip(cfg.attention_configs(), dpr)
        )
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, cfg.num_classes)
        self.apply(_init_weights)

    def forward(self, images: Tensor, labels: Optional[Tensor] = None) -> ModelOutput:
        """images (B, C, H, W) -> logits (B, num_classes); cross-entropy when labels are given."""
        c = self.cfg
        if images.dim() != 4 or images.shape[1:] != (c.in_chans, c.image_size, c.image_size):
            raise ValueError(
                f"images must have shape (B, {c.in_chans}, {c.image_size}, {c.image_size}), got {tuple(images.shape)}"
            )
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.drop(x + self.pos_embed)
        routings = []
        for blk in self.blocks:
            x, r = blk(x)
            routings.append(r)
        x = self.norm(x)
        logits = self.head(x[:, 0] if self.cls_token is not None else x.mean(1))
        task_loss = F.cross_entropy(logits, labels) if labels is not None else None
        out = ModelOutput(logits=logits, task_loss=task_loss, routings=routings)
        return finish_output(out, c.aux_loss_coef, labels, images.shape[0])


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _register(name: str, **kw) -> None:
    MODELS.register(name)(lambda: ViTConfig(**kw))


# tiny models for 28x28 (MNIST, Fashion-MNIST) and 32x32 (CIFAR-10): 8 heads of width 16
_TINY = dict(dim=128, depth=6, num_heads=8, mlp_ratio=2.0, patch_size=4)
_register("vit-tiny-mha", router="all", **_TINY)
_register("moh-vit-tiny-75", num_shared=2, top_k=4, **_TINY)  # (2 + 4) / 8 heads = 75%
_register("moh-vit-tiny-50", num_shared=2, top_k=2, **_TINY)  # (2 + 2) / 8 heads = 50%
_TINY32 = dict(_TINY, image_size=32, in_chans=3)
_register("vit-tiny32-mha", router="all", **_TINY32)
_register("moh-vit-tiny32-75", num_shared=2, top_k=4, **_TINY32)
_register("moh-vit-tiny32-50", num_shared=2, top_k=2, **_TINY32)
# ViT-S (6 heads) and ViT-B (12 heads) at the paper's head ratios, 224x224 images, patch 16.
_S = dict(image_size=224, patch_size=16, in_chans=3, num_classes=1000, dim=384, depth=12, num_heads=6)
_B = dict(image_size=224, patch_size=16, in_chans=3, num_classes=1000, dim=768, depth=12, num_heads=12)
_register("vit-s-mha", router="all", **_S)
# S-75: layers alternate 4 and 5 of 6 heads -> 54 / 72 head-layers = 75%
_register("moh-vit-s-75", layer_heads=[[2, 2], [2, 3]] * 6, **_S)
# S-80: ten layers with 5 and two with 4 of 6 heads -> 58 / 72 = 80.6% (6 heads allow no exact 80%)
_register("moh-vit-s-80", layer_heads=[[2, 2]] * 2 + [[2, 3]] * 10, **_S)
_register("vit-b-mha", router="all", **_B)
_register("moh-vit-b-50", num_shared=2, top_k=4, **_B)  # 6 / 12 heads
_register("moh-vit-b-75", num_shared=3, top_k=6, **_B)  # 9 / 12 heads
