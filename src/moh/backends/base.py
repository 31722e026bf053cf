"""What every backend receives, and small helpers they share.

Shape legend: B batch, T queries, S key positions, D width, H heads, G key/value heads, hd head width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor

from moh.core.routing import Routing
from moh.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from moh.core.attention import MoHAttention

BACKENDS: Registry[Callable[["AttentionCall"], Tensor]] = Registry("backend")


@dataclass
class AttentionCall:
    x: Tensor  # (B, T, D) layer input; backends project queries from it for the rows they need
    k: Tensor  # (B, G, S, hd) keys of every key position (cache + new), after qk-norm and RoPE
    v: Tensor  # (B, G, S, hd)
    routing: Routing
    key_mask: Optional[Tensor]  # bool (B, 1, S) or (B, T, S), True = may attend; causality not included
    causal: bool  # query t (key index q_offset + t) attends keys <= its own index
    q_offset: int  # key index of query 0 (the number of cached positions)
    positions: Tensor  # (B, T) RoPE positions of the queries
    scale: float
    dropout_p: float  # already 0 in eval mode
    attn: "MoHAttention"  # project_queries(...), out_weight(h)
    raw_q: Optional[Tensor] = None  # (B, T, H, hd) query projection before qk-norm/RoPE, if the router made it


def full_mask(call: AttentionCall) -> Optional[Tensor]:
    """The complete bool mask (B, T, S) (padding and causality), or None if nothing is masked."""
    B, T, _ = call.x.shape
    S = call.k.shape[2]
    mask = call.key_mask
    if call.causal:
        q_idx = torch.arange(T, device=call.x.device)[:, None] + call.q_offset
        causal = torch.arange(S, device=call.x.device)[None, :] <= q_idx  # (T, S)
        mask = causal[None] if mask is None else mask & causal
    return None if mask is None else mask.expand(B, T, S)


def masked_softmax(scores: Tensor, allowed: Optional[Tensor]) -> Tensor:
    """Softmax over the last dim where ``allowed``. A row with nothing allowed (a padded query
    under causality) gets all-zero probabilities, so its head output is exactly 0 in every backend
    whatever key blocks it was split into (the dtype's minimum, not -inf, keeps it free of NaN)."""
    if allowed is None:
        return torch.softmax(scores, dim=-1)
    probs = torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1)
    return probs.masked_fill(~allowed, 0.0)  # exact no-op on rows with an allowed key
