"""What every backend receives, and small helpers they share.

A backend is a callable ``fn(call: AttentionCall) -> Tensor (B, T, D)``: the layer's output, the
output projection and its bias included. It sees tensors and two narrow projection objects
(``moh.layers.projection``), never the attention module: queries of the (row, head) pairs it
needs come from ``call.q``, and gated head outputs go through ``call.out``.

Shape legend: B batch, T queries, S key positions, D width, H heads, G key/value heads, hd head width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from moh.core.routing import Routing
from moh.layers.projection import OutputProjection, QueryProjection
from moh.registry import BACKENDS

__all__ = ["BACKENDS", "AttentionCall", "full_mask", "masked_softmax"]


@dataclass
class AttentionCall:
    q: QueryProjection  # queries of chosen heads / rows, after qk-norm and RoPE
    k: Tensor  # (B, G, S, hd) keys of every key position (cache + new), after qk-norm and RoPE
    v: Tensor  # (B, G, S, hd)
    out: OutputProjection  # gated head outputs -> (B, T, D), bias included
    routing: Routing
    key_mask: Optional[Tensor]  # bool (B, 1, S) or (B, T, S), True = may attend; causality not included
    causal: bool  # query t (key index q_offset + t) attends keys <= its own index
    q_offset: int  # key index of query 0 (the number of cached positions)
    positions: Tensor  # (B, T) RoPE positions of the queries
    scale: float
    dropout_p: float  # already 0 in eval mode

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, T, H)."""
        return tuple(self.routing.gates_BTH.shape)  # type: ignore[return-value]


def full_mask(call: AttentionCall) -> Optional[Tensor]:
    """The complete bool mask (B, T, S) (padding and causality), or None if nothing is masked."""
    B, T, _ = call.shape
    S = call.k.shape[2]
    mask = call.key_mask
    if call.causal:
        q_idx = torch.arange(T, device=call.k.device)[:, None] + call.q_offset
        causal = torch.arange(S, device=call.k.device)[None, :] <= q_idx  # (T, S)
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
