"""MoHAttention: one attention module, a router and an execution backend chosen by name.

Output = sum_i g_i * head_i(x) W_O^i (paper Eq. 3), g_i = 0 for heads the token does not use.
The router decides (``Routing``); the backend computes. Both are looked up by the names in
``MoHConfig``; the backend can be switched at any time with ``set_backend``.

Shape legend: B batch, T new tokens, S key positions (cache + new), D width, H heads,
G key/value heads, hd head width.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from moh.backends import BACKENDS, AttentionCall
from moh.config import MoHConfig
from moh.core.cache import KVCache
from moh.core.routers import build_router
from moh.core.routing import Routing
from moh.layers.norm import RMSNorm
from moh.layers.projection import OutputProjection, QueryProjection
from moh.layers.rope import RotaryEmbedding, apply_rope


@dataclass
class MoHOutput:
    output: Tensor  # (B, T, D)
    routing: Routing


pytree.register_dataclass(MoHOutput, serialized_type_name="moh.core.attention.MoHOutput")  # torch.export


class MoHAttention(nn.Module):
    """Mixture-of-Head attention. Parameters are named as in LLaMA / HF attention (q_proj, k_proj,
    v_proj, o_proj), so pretrained weights copy over and adapters (PEFT) target them by name;
    the router's parameters live under ``router``. Any module may replace a projection after
    construction (a LoRA layer, a quantised linear): every backend uses what is there."""

    def __init__(self, cfg: MoHConfig):
        super().__init__()
        self.cfg = dataclasses.replace(cfg)  # this layer's own copy: set_backend never reaches other layers
        H, G, hd, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dim
        self.q_proj = nn.Linear(D, H * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, G * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, G * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * hd, D, bias=cfg.out_bias)
        self.q_norm = RMSNorm(hd) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd) if cfg.qk_norm else None
        self.rotary = RotaryEmbedding(hd, cfg.rope_theta) if cfg.rope else None
        self.router = build_router(cfg)

    def set_backend(self, name: str) -> None:
        BACKENDS.get(name)  # validates
        self.cfg.backend = name

    def forward(
        self,
        x: Tensor,
        attention_mask: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
        positions: Optional[Tensor] = None,
    ) -> MoHOutput:
        """x (B, T, D). ``attention_mask``: bool/0-1 (B, S) key padding, or bool (B, T, S) /
        (B, 1, T, S), True = may attend; S counts cached plus new positions. ``positions`` (B, T)
        are RoPE positions (default: cache length + 0..T-1). Everything is validated before the
        cache is touched: a rejected call leaves it as it was."""
        cfg = self.cfg
        if x.dim() != 3 or x.shape[-1] != cfg.dim:
            raise ValueError(f"input must have shape (B, T, dim={cfg.dim}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + T, device=x.device).expand(B, T)
        elif tuple(positions.shape) != (B, T):
            raise ValueError(f"positions must have shape {(B, T)}, got {tuple(positions.shape)}")
        key_mask = normalize_mask(attention_mask, B, T, past + T)
        if cache is not None:
            cache.check(B, cfg.num_kv_heads, cfg.head_dim)
        k, v = self._keys_values(x, positions)
        if cache is not None:
            k, v = cache.update(k, v)
        q = QueryProjection(self.q_proj, x, positions, cfg.num_heads, cfg.head_dim, self.q_norm, self.rotary)
        routing = self.router(x, q.raw)  # q.raw: the full query projection, made only if a router asks
        out = OutputProjection(self.o_proj, cfg.num_heads, cfg.head_dim)
        if B == 0 or T == 0:  # nothing to attend: the output projection's bias (or zeros)
            return MoHOutput(out.start(B, T).finish().to(x.dtype), routing)
        call = AttentionCall(
            q=q, k=k, v=v, out=out, routing=routing, key_mask=key_mask, causal=cfg.causal, q_offset=k.shape[2] - T,
            positions=positions, scale=cfg.head_dim**-0.5, dropout_p=cfg.dropout if self.training else 0.0,
        )
        return MoHOutput(BACKENDS.get(cfg.backend)(call), routing)

    def _keys_values(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the new tokens, (B, G, T, hd), keys after qk-norm and RoPE."""
        B, T, _ = x.shape
        G, hd = self.cfg.num_kv_heads, self.cfg.head_dim
        k = self.k_proj(x).view(B, T, G, hd)
        v = self.v_proj(x).view(B, T, G, hd)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if self.rotary is not None:
            cos, sin = self.rotary.cos_sin(positions, k.dtype)
            k = apply_rope(k, cos.unsqueeze(-2), sin.unsqueeze(-2))
        return k.transpose(1, 2), v.transpose(1, 2)


def normalize_mask(mask: Optional[Tensor], B: int, T: int, S: int) -> Optional[Tensor]:
    """Any accepted mask -> bool (B, 1, S) or (B, T, S), True = may attend."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ValueError(f"attention_mask must be a tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex or mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be bool (True = attend), or 0/1 integers for a (B, S) padding "
                f"mask; got dtype {mask.dtype} with shape {tuple(mask.shape)}"
            )
        bad = (mask != 0) & (mask != 1)
        if bad.any():
            raise ValueError(f"an integer attention_mask must hold only 0 and 1; found {mask[bad].unique()[:5].tolist()}")
        mask = mask != 0
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() == 2 and tuple(mask.shape) == (B, S):
        return mask[:, None, :]
    if mask.dim() == 3 and tuple(mask.shape) == (B, T, S):
        return mask
    raise ValueError(
        f"attention_mask has shape {tuple(mask.shape)}; expected (B, S)={(B, S)} or (B, T, S)={(B, T, S)} "
        f"or (B, 1, T, S)"
    )


def set_backend(model: nn.Module, name: str) -> int:
    """Switch every MoHAttention in ``model`` to backend ``name``; returns how many."""
    BACKENDS.get(name)
    n = 0
    for m in model.modules():
        if isinstance(m, MoHAttention):
            m.set_backend(name)
            n += 1
    return n
