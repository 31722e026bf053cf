"""MoH-DiT: a class-conditional diffusion transformer (DiT, Peebles & Xie 2023) whose attention is
MoHAttention (paper Sec. 4.3). The DiT baseline is the same model with router "all".

    images, labels -> noise at a random DDPM timestep (diffusers) -> patches + sin-cos positions
    -> blocks (the one ``Block`` with adaLN-Zero modulation by timestep + label embedding)
    -> final adaLN layer -> predicted noise; task loss = MSE to the true noise (epsilon
    prediction; DiT's learned sigma is not used: sampling uses the schedulers' fixed variances).

Labels are dropped to the null class with probability ``class_dropout`` while training, so the
same model predicts unconditionally for classifier-free guidance. An EMA of the weights (buffers
under ``ema.``, updated by ``after_optimizer_step``) is what sampling uses: ``use_ema()``.

The paper's per-layer head layouts: MoH-DiT routes only in part of the layers. Layers without
routed heads keep every head with learned shared gates softmax(W_s x) * H (the authors' code does
this too), e.g. MoH-DiT-S/2-90 = 8 layers of 3 shared + top-2 of 3 routed, then 4 such layers;
L/2 and XL/2 use 8 / 16 / 24 heads of width 64 / 72 in three layer groups.

Shape legend: B batch, C channels, Hi x Wi image size, p patch, T tokens, D width, P = p*p*C.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moh.config import MoHConfig
from moh.core.attention import MoHAttention
from moh.core.routing import Routing
from moh.layers.block import AdaLNModulation, Block, modulate
from moh.layers.embed import LabelEmbedder, TimestepEmbedder, check_patch_grid, sincos_pos_embed_2d, unpatchify
from moh.layers.mlp import MLP
from moh.models.base import HeadSpec, ModelOutput, finish_output
from moh.models.ema import EMA
from moh.models.factory import MODELS


@dataclass
class DiTConfig(HeadSpec):
    image_size: int = 28  # pixels (or latent cells: 32 for 256x256 images through the SD VAE)
    patch_size: int = 2
    in_chans: int = 1
    num_classes: int = 10
    dim: int = 128
    depth: int = 6
    num_heads: int = 8
    mlp_ratio: float = 4.0
    class_dropout: float = 0.1  # probability of the null label while training (classifier-free guidance)
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1 + n) / (10 + n)) for short runs
    loss_buckets: int = 4  # the MSE is also reported per range of timesteps (metrics mse_t<lo>-<hi>)

    def __post_init__(self) -> None:
        check_patch_grid(self.image_size, self.patch_size)
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"class_dropout={self.class_dropout} must be in [0, 1)")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes!r} must be a positive integer")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1]")
        if not 1 <= self.loss_buckets <= self.num_train_timesteps:
            raise ValueError(f"loss_buckets={self.loss_buckets} must be in [1, num_train_timesteps]")
        self.check_sizes("in_chans", "dim")

    def attention_configs(self) -> list[MoHConfig]:
        return self.layer_configs(self.dim, self.depth, qkv_bias=True, out_bias=True)

    def build(self) -> "DiT":
        return DiT(self)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to the patch values (B, T, P); zero-initialised, so
    the untrained model predicts zero noise."""

    def __init__(self, dim: int, cond_dim: int, out_per_token: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(cond_dim, 2 * dim)
        self.linear = nn.Linear(dim, out_per_token)
        for lin in (self.modulation, self.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x_BTD: Tensor, cond_BD: Tensor) -> Tensor:
        shift, scale = self.modulation(F.silu(cond_BD)).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x_BTD), shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D, p, C = cfg.dim, cfg.patch_size, cfg.in_chans
        self.grid = check_patch_grid(cfg.image_size, p)
        self.x_embedder = nn.Conv2d(C, D, p, p)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, self.grid, self.grid)[None], persistent=False)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        self.blocks = nn.ModuleList(
            Block(MoHAttention(a), MLP(D, int(D * cfg.mlp_ratio)), _norm(D), _norm(D), modulation=AdaLNModulation(D, D))
            for a in cfg.attention_configs()
        )
        self.final = FinalLayer(D, D, p * p * C)
        self._init_weights()
        self._scheduler = None  # made on first use: importing diffusers takes seconds
        self.ema = EMA(self.named_parameters(), cfg.ema_decay, cfg.ema_warmup)  # after init: starts at it
        # DDP need not broadcast the EMA before every forward: each process computes the same average
        self._ddp_params_and_buffers_to_ignore = [f"ema.{n}" for n, _ in self.ema.named_buffers()]

    def _init_weights(self) -> None:
        """DiT's init: xavier-uniform attention and MLP weights, zero biases; the patch embedding
        like a linear layer. Routers keep their own init; modulations and the final layer stay 0."""
        for name, m in self.blocks.named_modules():
            parts = name.split(".")
            if isinstance(m, nn.Linear) and "router" not in parts and "modulation" not in parts:
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.cfg.dim, -1))
        nn.init.zeros_(self.x_embedder.bias)

    @property
    def scheduler(self):
        """The diffusers DDPMScheduler of the training noise (samplers are made from its config)."""
        if self._scheduler is None:
            from moh.diffusion import training_scheduler

            c = self.cfg
            self._scheduler = training_scheduler(c.num_train_timesteps, c.beta_schedule, c.beta_start, c.beta_end)
        return self._scheduler

    # ------------------------------------------------------------------------------------------
    def denoise(self, x_BCHW: Tensor, t_B: Tensor, labels_B: Tensor) -> tuple[Tensor, list[Routing]]:
        """(predicted noise (B, C, Hi, Wi), one Routing per block) for noisy images at timesteps
        ``t_B`` with class labels ``labels_B`` (``num_classes`` = the null class)."""
        c = self.cfg
        x = self.x_embedder(x_BCHW).flatten(2).transpose(1, 2) + self.pos_embed  # (B, T, D)
        cond = self.t_embedder(t_B) + self.y_embedder(labels_B)  # (B, D)
        routings = []
        for blk in self.blocks:
            x, r = blk(x, cond=cond)
            routings.append(r)
        out = self.final(x, cond)  # (B, T, P)
        return unpatchify(out, c.patch_size, c.in_chans, self.grid, self.grid), routings

    def predict_noise(self, x_BCHW: Tensor, t_B: Tensor, labels_B: Tensor) -> Tensor:
        """Predicted noise (B, C, Hi, Wi); the ``moh.diffusion`` samplers call this."""
        return self.denoise(x_BCHW, t_B, labels_B)[0]

    def forward(self, images: Tensor, labels: Optional[Tensor] = None) -> ModelOutput:
        """images (B, C, Hi, Wi) (the data set's scale), labels (B,) (None: unconditional). Draws a
        timestep and noise per image from the global torch RNG, so a seeded, resumed run replays
        them; returns the noise MSE as ``task_loss`` (plus the balance term in ``loss``)."""
        self._check_images(images)
        B = images.shape[0]
        if labels is None:
            labels = torch.full((B,), self.y_embedder.null_class, dtype=torch.long, device=images.device)
        t_B = torch.randint(0, self.cfg.num_train_timesteps, (B,), device=images.device)
        noise = torch.randn_like(images)
        x_t = self.scheduler.add_noise(images, noise, t_B)
        if self.training:
            labels = self.y_embedder.drop(labels, self.cfg.class_dropout)
        eps, routings = self.denoise(x_t, t_B, labels)
        mse_B = (eps.float() - noise.float()).pow(2).mean((1, 2, 3))
        out = ModelOutput(task_loss=mse_B.mean(), routings=routings)
        out = finish_output(out, self.cfg.aux_loss_coef, None, B)
        out.metrics.update(self._bucket_metrics(mse_B.detach(), t_B))
        return out

    def _check_images(self, images: Tensor) -> None:
        c = self.cfg
        if images.dim() != 4 or tuple(images.shape[1:]) != (c.in_chans, c.image_size, c.image_size):
            raise ValueError(
                f"images must have shape (B, {c.in_chans}, {c.image_size}, {c.image_size}), got {tuple(images.shape)}")

    def _bucket_metrics(self, mse_B: Tensor, t_B: Tensor) -> dict:
        """``mse_t<lo>-<hi>``: (sum of the MSE of the batch's images in the timestep range, count)."""
        T, n = self.cfg.num_train_timesteps, self.cfg.loss_buckets
        bucket_B = t_B * n // T
        metrics = {}
        for b in range(n):
            sel = bucket_B == b
            metrics[f"mse_t{b * T // n}-{(b + 1) * T // n - 1}"] = (mse_B[sel].sum(), sel.sum())
        return metrics

    # ------------------------------------------------------------------------------------------
    def _own_params(self):
        return self.named_parameters()

    def after_optimizer_step(self) -> None:
        """The engine calls this after every optimizer step: one EMA update."""
        self.ema.update(self._own_params())

    def use_ema(self) -> "DiT":
        """Replace the weights by their EMA (what sampling and evaluation use); returns self."""
        self.ema.copy_to(self._own_params())
        return self

    def ema_applied(self):
        """Context manager: the EMA weights inside, the trained ones restored after."""
        return self.ema.applied(self._own_params())


def _norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


# ---------------------------------------------------------------------------------------------
# presets


def _register(name: str, **kw) -> None:
    MODELS.register(name)(lambda: DiTConfig(**kw))


def _register_family(size: str, base: dict, moh90: list, moh75: list) -> None:
    """dit-<size>-mha (router all), moh-dit-<size>-90 and -75 (the paper's per-layer layouts)."""
    _register(f"dit-{size}-mha", router="all", **base)
    _register(f"moh-dit-{size}-90", layer_heads=moh90, **base)
    _register(f"moh-dit-{size}-75", layer_heads=moh75, **base)


# tiny DiTs for 28x28x1 (Fashion-MNIST) and 32x32x3 (CIFAR-10): width 64, 8 heads of width 8, patch 4
# (49 / 64 tokens), 0.48M parameters: sized so the Fashion-MNIST comparison of RESULTS.md (3 models x
# 2 seeds) trains on a shared 2-core CPU in about an hour.
# Layouts in the paper's spirit (routing in the early layers, every head in the last):
# 90: 5 x (4 shared + top-3 of 4) + 1 x all 8 = 43 / 48 heads = 89.6%
# 75: 2 x (3 + top-2 of 5) + 3 x (4 + top-2 of 4) + 1 x all 8 = 36 / 48 = 75%
_TINY = dict(dim=64, depth=6, num_heads=8, mlp_ratio=4.0, patch_size=4, ema_decay=0.999, ema_warmup=True)
_TINY90 = [[4, 3]] * 5 + [[8, 0]]
_TINY75 = [[3, 2]] * 2 + [[4, 2]] * 3 + [[8, 0]]
_register_family("tiny", _TINY, _TINY90, _TINY75)
_register_family("tiny32", dict(_TINY, image_size=32, in_chans=3), _TINY90, _TINY75)

# The paper's sizes on 256x256 ImageNet latents (32x32x4 through the SD VAE), patch 2, 1000 classes;
# layouts as in the authors' MoH-DiT code. Heads used / heads of DiT:
# S/2-90 64/72 = 88.9%, S/2-75 54/72; B/2-90 129/144 = 89.6%, B/2-75 108/144;
# L/2-90 344/384 = 89.6%, L/2-75 288/384; XL/2-90 403/448 = 90.0%, XL/2-75 336/448.
_PAPER = dict(image_size=32, patch_size=2, in_chans=4, num_classes=1000, mlp_ratio=4.0, ema_decay=0.9999)
_register_family("s2", dict(_PAPER, dim=384, depth=12, num_heads=6),
                 [[3, 2]] * 8 + [[6, 0]] * 4,
                 [[2, 1]] * 2 + [[3, 1]] * 4 + [[3, 2]] * 4 + [[6, 0]] * 2)
_register_family("b2", dict(_PAPER, dim=768, depth=12, num_heads=12),
                 [[6, 4]] * 5 + [[7, 4]] * 5 + [[12, 0]] * 2,
                 [[4, 2]] * 2 + [[6, 3]] * 8 + [[12, 0]] * 2)
_register_family("l2", dict(_PAPER, dim=1024, depth=24, num_heads=16, head_dim=64),
                 [[8, 8, 0]] * 8 + [[16, 16, 0]] * 8 + [[24, 16, 3]] * 8,
                 [[8, 8, 0]] * 8 + [[16, 8, 4]] * 8 + [[24, 12, 4]] * 8)
_register_family("xl2", dict(_PAPER, dim=1152, depth=28, num_heads=16, head_dim=72),
                 [[8, 8, 0]] * 9 + [[16, 16, 0]] * 10 + [[24, 16, 3]] * 9,
                 [[8, 8, 0]] * 9 + [[16, 10, 2]] * 10 + [[24, 14, 2]] * 9)
