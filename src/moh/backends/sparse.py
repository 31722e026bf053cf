"""The sparse backend: work only for the (token, head) pairs the router selected.

For every head, gather the tokens that use it, project their queries (only those rows),
attend over the keys/values of all positions, weight by the gate and project with W_O^h
(only those rows), then scatter-add into the output. Heads no token uses cost nothing.
Causal attention skips key blocks that every query of a row block is past
(blocks of ``ROW_BLOCK`` queries, sorted by position). Autograd runs through all of it.

Shape legend: B batch, T queries, S key positions, D width, M selected rows per batch item,
hd head width.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from moh.backends.base import BACKENDS, AttentionCall, masked_softmax

ROW_BLOCK = 256  # query rows per block when masking / skipping causal key blocks
MAX_SCORES = 1 << 22  # bound on B * rows * S elements of one score block (memory)


def _select_rows(active_BT: Tensor) -> tuple[Tensor, int]:
    """Token indices (B, M) of the rows that use a head, ascending; M = the largest count in the
    batch. Items with fewer rows are padded with unused positions (their gate is 0)."""
    B, T = active_BT.shape
    if B == 1:
        idx = active_BT[0].nonzero().squeeze(1)
        return idx[None], idx.numel()
    M = int(active_BT.sum(1).max())
    t = torch.arange(T, device=active_BT.device)
    order = torch.where(active_BT, t, t + T).argsort(dim=1)  # used rows first, in order
    return order[:, :M], M


def _attend(
    q_BMd: Tensor,
    k_BSd: Tensor,
    v_BSd: Tensor,
    qidx_BM: Optional[Tensor],
    mask_BMS: Optional[Tensor],
    causal: bool,
    dropout_p: float,
) -> Tensor:
    """softmax(q k^T) v for pre-scaled queries. ``qidx_BM``: key index of each query row (for
    causality; rows ascending). ``mask_BMS``: bool (B, M or 1, S) padding mask or None."""
    B, M, _ = q_BMd.shape
    S = k_BSd.shape[1]
    if not causal and mask_BMS is None and B * M * S <= MAX_SCORES:
        probs = torch.softmax(q_BMd @ k_BSd.transpose(-1, -2), dim=-1)
        return F.dropout(probs, dropout_p, training=dropout_p > 0) @ v_BSd
    rows = ROW_BLOCK if causal or mask_BMS is not None else max(1, MAX_SCORES // max(B * S, 1))
    starts = list(range(0, M, rows))
    if causal:  # the last key each row block needs: the largest query index in the block
        padded = F.pad(qidx_BM, (0, len(starts) * rows - M), value=-1)
        ends = padded.view(B, len(starts), rows).amax((0, 2)).add(1).clamp(max=S).tolist()
    outs = []
    for i, s in enumerate(starts):
        e = min(s + rows, M)
        kend = ends[i] if causal else S
        scores = q_BMd[:, s:e] @ k_BSd[:, :kend].transpose(-1, -2)  # (B, rows, kend)
        allowed = None
        if causal:
            allowed = torch.arange(kend, device=q_BMd.device) <= qidx_BM[:, s:e, None]
        if mask_BMS is not None:
            m = mask_BMS[:, s:e, :kend] if mask_BMS.shape[1] == M else mask_BMS[:, :, :kend]
            allowed = m if allowed is None else allowed & m
        probs = masked_softmax(scores, allowed)
        probs = F.dropout(probs, dropout_p, training=dropout_p > 0)
        outs.append(probs @ v_BSd[:, :kend])
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


@BACKENDS.register("sparse")
def sparse_attention(call: AttentionCall) -> Tensor:
    x = call.x
    B, T, D = x.shape
    r = call.routing
    H, G = r.num_heads, call.k.shape[1]
    counts = r.active_BTH.sum((0, 1)).tolist()  # tokens per head
    full = call.key_mask is not None and call.key_mask.shape[1] == T
    out = x.new_zeros(B, T, D)
    t_all = torch.arange(T, device=x.device).expand(B, T) + call.q_offset
    for h in range(H):
        if counts[h] == 0:
            continue  # no token uses this head: skip all of its work
        g = h // (H // G)
        if counts[h] == B * T:  # every token (shared heads, dense routing): no gather
            x_rows, pos, qidx, gate, mask = x, call.positions, t_all, r.gates_BTH[..., h : h + 1], call.key_mask
            idx = None
        else:
            idx, M = _select_rows(r.active_BTH[..., h])  # (B, M)
            x_rows = x.gather(1, idx[..., None].expand(B, M, D))
            pos = call.positions.gather(1, idx)
            qidx = idx + call.q_offset
            gate = r.gates_BTH[..., h].gather(1, idx)[..., None]
            mask = call.key_mask
            if full:
                mask = mask.gather(1, idx[..., None].expand(B, M, mask.shape[-1]))
        q = call.attn.project_queries(x_rows, slice(h, h + 1), pos)[:, :, 0] * call.scale  # (B,M,hd)
        head = _attend(q, call.k[:, g], call.v[:, g], qidx, mask, call.causal, call.dropout_p)
        y = (head * gate) @ call.attn.out_weight(h).T  # (B, M, D)
        if idx is None:
            out = out + y
        else:
            out = out.scatter_add(1, idx[..., None].expand_as(y), y)
    return out
