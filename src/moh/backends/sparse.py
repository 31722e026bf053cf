"""The sparse backend: work only for the (token, head) pairs the router selected.

Heads every token uses (shared heads, the ``all`` router, and most heads at decode time) are
computed together in contiguous groups without any gather. For every other head, gather the
tokens that use it, project their queries (only those rows), attend over the keys/values of all
positions, weight by the gate and project with W_O^h (only those rows), then scatter-add into the
output. Heads no token uses cost nothing. Keys/values are computed for every token by the caller.

Attention runs in blocks of ``ROW_BLOCK`` query rows (sorted by position) so the score block stays
in cache. Under causality a block reads keys only up to its last query, and only the diagonal
part of the key range (keys past the block's first query) is masked; the prefix every query of
the block may see is left unmasked. Key padding is one additive bias row. Autograd runs through
all of it (in-place masking is on fresh matmul outputs, which autograd does not save).

Shape legend: B batch, T queries, S key positions, D width, h heads in a group, M selected rows
per batch item, hd head width.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from moh.backends.base import BACKENDS, AttentionCall

ROW_BLOCK = 256  # causal query rows per attention call (keys past a block's last query are skipped)


def _select_rows(active_BT: Tensor, counts_B: list[int]) -> tuple[Tensor, Optional[Tensor]]:
    """Token indices (B, M) of the rows that use a head, ascending; M = the largest count in the
    batch. Shorter items are padded with T - 1 (so rows stay ascending) and flagged in
    ``valid_BM`` (False), whose gate must be zeroed."""
    B, T = active_BT.shape
    if B == 1:
        return active_BT[0].nonzero().view(1, -1), None
    M = max(counts_B)
    t = torch.arange(T, device=active_BT.device)
    order = torch.where(active_BT, t, t + T).argsort(dim=1)[:, :M]  # used rows first, ascending
    valid = torch.arange(M, device=active_BT.device) < active_BT.sum(1, keepdim=True)
    return torch.where(valid, order, T - 1), valid


def _attend(
    call: AttentionCall, q: Tensor, k: Tensor, v: Tensor, qpos_BM: Tensor, mask_BMS: Optional[Tensor], every_row: bool
) -> Tensor:
    """Attention of queries q (B, h, M, hd) at key indices ``qpos_BM`` (ascending) over k, v
    (B, h, S, hd) with fused SDPA; returns (B, h, M, hd). ``mask_BMS``: per-row bool mask or None
    (then ``call.key_mask`` (B, 1, S) applies). ``every_row``: the rows are all T queries in order.
    Rows that may attend to nothing give 0 (SDPA's
    behaviour for a fully masked row, which ``masked_softmax`` matches)."""
    M, S = q.shape[2], k.shape[2]
    key_ok = call.key_mask[:, None] if mask_BMS is None and call.key_mask is not None else None  # (B,1,1,S)
    mask = mask_BMS[:, None] if mask_BMS is not None else key_ok
    sdpa = lambda q_, k_, v_, m_, causal=False: F.scaled_dot_product_attention(  # noqa: E731
        q_, k_, v_, attn_mask=m_, dropout_p=call.dropout_p, is_causal=causal, scale=call.scale
    )
    if not call.causal or call.q_offset >= S - 1:  # decode: the new token sees every key
        return sdpa(q, k, v, mask)
    if mask is None and every_row and call.q_offset == 0:  # all rows, no cache: SDPA's own causal path
        return sdpa(q, k, v, None, causal=True)
    outs = []
    for s in range(0, M, ROW_BLOCK):
        e = min(s + ROW_BLOCK, M)
        kend = min(int(qpos_BM[:, e - 1].max()) + 1, S)  # the block's last query sees no further
        allowed = torch.arange(kend, device=q.device) <= qpos_BM[:, None, s:e, None]  # (B,1,rows,kend)
        if mask is not None:
            allowed = allowed & mask[:, :, s:e, :kend] if mask.shape[2] > 1 else allowed & mask[..., :kend]
        outs.append(sdpa(q[:, :, s:e], k[:, :, :kend], v[:, :, :kend], allowed))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _kv_heads(call: AttentionCall, h0: int, h1: int) -> tuple[Tensor, Tensor]:
    """Keys/values read by query heads h0..h1-1, (B, h, S, hd): a view without GQA."""
    H, G = call.routing.num_heads, call.k.shape[1]
    if G == H:
        return call.k[:, h0:h1], call.v[:, h0:h1]
    g = torch.arange(h0, h1, device=call.k.device) // (H // G)
    return call.k.index_select(1, g), call.v.index_select(1, g)


def _dense_group(call: AttentionCall, h0: int, h1: int) -> Tensor:
    """Heads h0..h1-1, used by every token: no gather. Returns their output (B, T, D)."""
    B, T, D = call.x.shape
    hd = call.k.shape[-1]
    q = call.attn.project_queries(call.x, slice(h0, h1), call.positions).transpose(1, 2)  # (B,h,T,hd)
    k, v = _kv_heads(call, h0, h1)
    qpos = torch.arange(T, device=q.device).expand(B, T) + call.q_offset
    mask = call.key_mask if call.key_mask is not None and call.key_mask.shape[1] == T else None
    head = _attend(call, q, k, v, qpos, mask, every_row=True)  # (B, h, T, hd)
    head = head * call.routing.gates_BTH[..., h0:h1].transpose(1, 2)[..., None]
    return head.transpose(1, 2).reshape(B, T, -1) @ call.attn.o_proj.weight[:, h0 * hd : h1 * hd].T


def _routed_head(call: AttentionCall, h: int, counts_B: list[int], out_nD: Tensor) -> Tensor:
    """Head h for the rows that use it only; adds its output into ``out_nD`` (B*T, D)."""
    x = call.x
    B, T, D = x.shape
    idx, valid = _select_rows(call.routing.active_BTH[..., h], counts_B)  # (B, M)
    M = idx.shape[1]
    flat = (idx + torch.arange(B, device=x.device)[:, None] * T).view(-1) if B > 1 else idx.view(-1)
    x_rows = x.reshape(B * T, D).index_select(0, flat).view(B, M, D)
    q = call.attn.project_queries(x_rows, slice(h, h + 1), call.positions.gather(1, idx))  # (B,M,1,hd)
    k, v = _kv_heads(call, h, h + 1)
    mask = call.key_mask
    mask = mask.gather(1, idx[..., None].expand(B, M, mask.shape[-1])) if mask is not None and mask.shape[1] == T else None
    head = _attend(call, q.transpose(1, 2), k, v, idx + call.q_offset, mask, every_row=False)[:, 0]  # (B,M,hd)
    gate = call.routing.gates_BTH[..., h].gather(1, idx)  # (B, M)
    if valid is not None:
        gate = gate * valid  # padded rows repeat a real row: they must add nothing
    y = (head * gate[..., None]) @ call.attn.out_weight(h).T  # (B, M, D)
    return out_nD.index_add_(0, flat, y.reshape(B * M, D))


def _runs(heads: list[int]) -> list[tuple[int, int]]:
    """[0, 1, 2, 5, 6] -> [(0, 3), (5, 7)]: contiguous ranges, so a group is one weight slice."""
    runs = []
    for h in heads:
        if runs and runs[-1][1] == h:
            runs[-1] = (runs[-1][0], h + 1)
        else:
            runs.append((h, h + 1))
    return runs


@BACKENDS.register("sparse")
def sparse_attention(call: AttentionCall) -> Tensor:
    x = call.x
    B, T, D = x.shape
    r = call.routing
    counts = r.active_BTH.sum(1).tolist()  # tokens per (item, head); one host sync for the layer
    per_head = [sum(c[h] for c in counts) for h in range(r.num_heads)]
    out = None
    for h0, h1 in _runs([h for h, n in enumerate(per_head) if n == B * T]):
        y = _dense_group(call, h0, h1)
        out = y if out is None else out + y
    out = x.new_zeros(B * T, D) if out is None else out.reshape(B * T, D)
    for h, n in enumerate(per_head):
        if 0 < n < B * T:  # heads no token uses are skipped entirely
            out = _routed_head(call, h, [c[h] for c in counts], out)
    return out.view(B, T, D)
