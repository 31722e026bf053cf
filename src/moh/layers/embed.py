"""Embeddings of the diffusion transformer (DiT, Peebles & Xie 2023): patches and their fixed 2-D
sin-cos positions, diffusion timesteps, class labels with the null class of classifier-free
guidance.

Shape legend: B batch, C channels, Hi x Wi image size, p patch size, h = Hi / p, w = Wi / p,
T = h * w tokens, D width, F frequency channels, P = p * p * C values per patch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_patch_grid(image_size: int, patch_size: int) -> int:
    """Patches per side; ValueError naming both numbers unless ``patch_size`` divides ``image_size``."""
    for name, v in (("image_size", image_size), ("patch_size", patch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
    return image_size // patch_size


def unpatchify(x_BTP: Tensor, patch_size: int, channels: int, h: int, w: int) -> Tensor:
    """Per-token patch values (B, T, P) -> images (B, C, h*p, w*p); token order row-major over the
    (h, w) grid, values within a patch ordered (row, column, channel), as DiT's final layer."""
    B, T, P = x_BTP.shape
    p, C = patch_size, channels
    if T != h * w or P != p * p * C:
        raise ValueError(f"patch tensor {tuple(x_BTP.shape)} does not fit a {h}x{w} grid of {p}x{p}x{C} patches")
    x = x_BTP.view(B, h, w, p, p, C)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, h * p, w * p)


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (T, D) (MAE / DiT): the first D/2 channels encode the
    row, the last D/2 the column, each [sin, cos] of D/4 frequencies."""
    if dim % 4:
        raise ValueError(f"dim={dim} must be divisible by 4 for the 2-D sin-cos position embedding")
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    return torch.cat([_sincos_1d(dim // 2, rows.reshape(-1)), _sincos_1d(dim // 2, cols.reshape(-1))], 1).float()


def _sincos_1d(dim: int, pos_T: Tensor) -> Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    angles = pos_T[:, None] * omega[None]  # (T, dim/2)
    return torch.cat([angles.sin(), angles.cos()], 1)


def timestep_frequencies(t_B: Tensor, channels: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features (B, F) of (possibly fractional) timesteps: [cos, sin] of F/2 frequencies
    from 1 down to 1/max_period (GLIDE / DiT)."""
    half = channels // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    args = t_B.float()[:, None] * freqs[None]  # (B, F/2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    return F.pad(emb, (0, channels % 2))


class TimestepEmbedder(nn.Module):
    """Timesteps (B,) -> (B, D): sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, dim: int, freq_channels: int = 256):
        super().__init__()
        self.freq_channels = freq_channels
        self.mlp = nn.Sequential(nn.Linear(freq_channels, dim), nn.SiLU(), nn.Linear(dim, dim))
        for i in (0, 2):
            nn.init.normal_(self.mlp[i].weight, std=0.02)
            nn.init.zeros_(self.mlp[i].bias)

    def forward(self, t_B: Tensor) -> Tensor:
        return self.mlp(timestep_frequencies(t_B, self.freq_channels))


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, D). Index ``num_classes`` is the null class: the "no label" input
    of classifier-free guidance, which training learns through label dropout."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def drop(self, labels_B: Tensor, p: float) -> Tensor:
        """Each label replaced by the null class with probability ``p`` (the global torch RNG, so a
        seeded and resumed run replays it)."""
        if p <= 0:
            return labels_B
        dropped = torch.rand(labels_B.shape, device=labels_B.device) < p
        return torch.where(dropped, torch.full_like(labels_B, self.null_class), labels_B)

    def forward(self, labels_B: Tensor) -> Tensor:
        outside = (labels_B < 0) | (labels_B > self.num_classes)
        if outside.any():  # one host sync; an out-of-range index would fail less clearly below
            bad = labels_B[outside][0]
            raise ValueError(f"class label {int(bad)} is not in [0, {self.num_classes}] "
                             f"({self.num_classes} classes and the null class {self.null_class})")
        return self.table(labels_B)


__all__ = ["check_patch_grid", "unpatchify", "sincos_pos_embed_2d", "timestep_frequencies", "TimestepEmbedder",
           "LabelEmbedder"]
