"""MoHAttention: one attention module, a router and an execution backend chosen by name.

Output = sum_i g_i * head_i(x) W_O^i (paper Eq. 3), g_i = 0 for heads the token does not use.
The router decides (``Routing``); the backend computes. Both are looked up by the names in
``MoHConfig``; the backend can be switched at any time with ``set_backend``.

Shape legend: B batch, T new tokens, S key positions (cache + new), D width, H heads,
G key/value heads, hd head width.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache as _memo
from typing import Optional

import torch
from torch import Tensor, nn

from moh.backends import BACKENDS, AttentionCall
from moh.config import MoHConfig
from moh.core.cache import KVCache
from moh.core.routers import build_router
from moh.core.routing import Routing
from moh.layers.gather import gather_bmm
from moh.layers.norm import RMSNorm
from moh.layers.rope import RotaryEmbedding, apply_rope


@dataclass
class MoHOutput:
    output: Tensor  # (B, T, D)
    routing: Routing


class MoHAttention(nn.Module):
    def __init__(self, cfg: MoHConfig):
        super().__init__()
        self.cfg = cfg
        H, G, hd, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dim
        self.q_proj = nn.Linear(D, H * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, G * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, G * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * hd, D, bias=cfg.out_bias)
        self.q_norm = RMSNorm(hd) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd) if cfg.qk_norm else None
        self.rotary = RotaryEmbedding(hd, cfg.rope_theta) if cfg.rope else None
        self.router = build_router(cfg)

    # ------------------------------------------------------------------------------------------
    def set_backend(self, name: str) -> None:
        BACKENDS.get(name)  # validates
        self.cfg.backend = name

    def project_queries(self, x_nD: Tensor, heads: slice, positions_n: Tensor, raw: Optional[Tensor] = None) -> Tensor:
        """Queries of ``heads`` for the rows of ``x_nD`` (any leading shape ...):
        (..., D) -> (..., h, hd), after qk-norm and RoPE at ``positions_n`` (shape ...).
        ``raw`` (..., H, hd): the query projection of the same rows if already made (then reused)."""
        H, hd, D = self.cfg.num_heads, self.cfg.head_dim, self.cfg.dim
        if raw is not None:
            q = raw[..., heads, :]
        else:
            w = self.q_proj.weight.view(H, hd, D)[heads].reshape(-1, D)
            b = None if self.q_proj.bias is None else self.q_proj.bias.view(H, hd)[heads].reshape(-1)
            q = nn.functional.linear(x_nD, w, b).unflatten(-1, (-1, hd))
        return self._norm_rope(q, positions_n.unsqueeze(-1))

    def project_head_rows(self, x_nD: Tensor, rows_BPM: Tensor, heads: list[int], positions_BPM: Tensor) -> Tensor:
        """Queries of head ``heads[p]`` for the rows ``x_nD[rows_BPM[:, p]]`` (each head its own
        rows; x (n, D) flattened over batch and tokens) -> (B, P, M, hd), after qk-norm and RoPE at
        ``positions_BPM``."""
        H, hd, D = self.cfg.num_heads, self.cfg.head_dim, self.cfg.dim
        w = self.q_proj.weight.view(H, hd, D)[heads]  # (P, hd, D)
        q = gather_bmm(x_nD, rows_BPM, w.transpose(1, 2))  # (B, P, M, hd)
        if self.q_proj.bias is not None:
            q = q + self.q_proj.bias.view(H, hd)[heads][:, None]
        return self._norm_rope(q, positions_BPM)

    def gather_head_rows(self, raw_BTHd: Tensor, heads: list[int], tokens_BPM: Tensor, positions_BPM: Tensor) -> Tensor:
        """Like ``project_head_rows``, from queries already projected: head ``heads[p]`` of the tokens
        ``tokens_BPM[b, p]`` (indices within item b) of ``raw_BTHd`` (B, T, H, hd) -> (B, P, M, hd),
        after qk-norm and RoPE."""
        B, T, H, hd = raw_BTHd.shape
        P, M = tokens_BPM.shape[1:]
        head = torch.tensor(heads, device=tokens_BPM.device)[None, :, None]
        flat = ((torch.arange(B, device=tokens_BPM.device)[:, None, None] * T + tokens_BPM) * H + head).view(-1)
        q = raw_BTHd.reshape(B * T * H, hd).index_select(0, flat).view(B, P, M, hd)
        return self._norm_rope(q, positions_BPM)

    def _norm_rope(self, q: Tensor, positions: Tensor) -> Tensor:
        """qk-norm and RoPE of queries q (..., hd); ``positions`` broadcast to q's leading shape."""
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.rotary is not None:
            cos, sin = self.rotary.cos_sin(positions, q.dtype)
            q = apply_rope(q, cos, sin)
        return q

    def out_weight(self, head: int) -> Tensor:
        """W_O^h as a (D, hd) view."""
        hd = self.cfg.head_dim
        return self.o_proj.weight[:, head * hd : (head + 1) * hd]

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        attention_mask: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
        positions: Optional[Tensor] = None,
    ) -> MoHOutput:
        """x (B, T, D). ``attention_mask``: bool/0-1 (B, S) key padding, or bool (B, T, S) /
        (B, 1, T, S), True = may attend; S counts cached plus new positions. ``positions`` (B, T)
        are RoPE positions (default: cache length + 0..T-1)."""
        cfg = self.cfg
        if x.dim() != 3 or x.shape[-1] != cfg.dim:
            raise ValueError(f"input must have shape (B, T, dim={cfg.dim}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + T, device=x.device).expand(B, T)
        elif positions.shape != (B, T):
            raise ValueError(f"positions must have shape {(B, T)}, got {tuple(positions.shape)}")
        G, hd = cfg.num_kv_heads, cfg.head_dim
        k = self.k_proj(x).view(B, T, G, hd)
        v = self.v_proj(x).view(B, T, G, hd)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if self.rotary is not None:
            cos, sin = self.rotary.cos_sin(positions, k.dtype)
            k = apply_rope(k, cos.unsqueeze(-2), sin.unsqueeze(-2))
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, G, T, hd)
        if cache is not None:
            k, v = cache.update(k, v)
        S = k.shape[2]

        @_memo
        def raw_queries() -> Tensor:  # (B, T, H, hd), before qk-norm / RoPE; only some routers ask
            return self.q_proj(x).view(B, T, cfg.num_heads, hd)

        routing = self.router(x, raw_queries)
        raw_q = raw_queries() if raw_queries.cache_info().currsize else None  # reuse, never force
        call = AttentionCall(
            x=x,
            k=k,
            v=v,
            routing=routing,
            key_mask=normalize_mask(attention_mask, B, T, S),
            causal=cfg.causal,
            q_offset=S - T,
            positions=positions,
            scale=hd**-0.5,
            dropout_p=cfg.dropout if self.training else 0.0,
            attn=self,
            raw_q=raw_q,
        )
        y = BACKENDS.get(cfg.backend)(call)
        if self.o_proj.bias is not None:
            y = y + self.o_proj.bias
        return MoHOutput(y, routing)


def normalize_mask(mask: Optional[Tensor], B: int, T: int, S: int) -> Optional[Tensor]:
    """Any accepted mask -> bool (B, 1, S) or (B, T, S), True = may attend."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be bool (True = attend), or 0/1 integers for a (B, S) padding "
                f"mask; got dtype {mask.dtype} with shape {tuple(mask.shape)}"
            )
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
