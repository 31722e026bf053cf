"""Rows of partially used heads: which tokens use each head, gathered to a padded (B, P, M) grid
in ascending order, with their positions, gates and per-row masks; and the keys/values each
query head reads. Scattering the results back is the output projection's job
(``moh.layers.projection.OutputProjection.add_rows``).

Shape legend: B batch, T queries, S key positions, H heads, G key/value heads, P heads in a
group, M rows per head, hd head width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from moh.kernels import cpu as cpu_kernels


@dataclass
class HeadRows:
    """For head ``heads[p]`` of item b: the first ``count`` tokens that use it, ascending, padded
    to M by repeating the last token (so rows stay ascending); padding rows are gated 0."""

    heads: list[int]
    tokens_BPM: Tensor  # token index within its item
    valid_BPM: Tensor  # bool: a real row, not padding
    flat_BPM: Tensor  # index into the B*T flattened rows
    positions_BPM: Tensor  # RoPE positions of the rows
    gate_index_BPM: Optional[Tensor] = None  # flat * H + head: the row's gate in (B, T, H), row-major

    def narrow(self, p0: int, P: int, M: int) -> "HeadRows":
        """Heads p0..p0+P-1 with their first M rows (views): M at least their largest count."""
        def cut(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t[:, p0 : p0 + P, :M]
        return HeadRows(self.heads[p0 : p0 + P], cut(self.tokens_BPM), cut(self.valid_BPM), cut(self.flat_BPM),
                        cut(self.positions_BPM), cut(self.gate_index_BPM))

    def key_index(self, q_offset: int) -> Tensor:
        """(B, P, M) key index of every row (its causal horizon)."""
        return self.tokens_BPM + q_offset


def gather_rows(active_BTH: Tensor, heads: list[int], M: int, positions_BT: Tensor) -> HeadRows:
    """M: at least the largest count of tokens of any (item, head). On CPU one pass of moh's
    kernel (``moh.kernels.cpu.head_rows``: 10 heads of 2048 tokens, ~0.8 ms of torch operations
    in the layer); elsewhere the tokens of every (item, head) in order come from one ``nonzero``
    (an argsort of (B, P, T) costs 3-4x as much)."""
    B, T, _ = active_BTH.shape
    P, device = len(heads), active_BTH.device
    if device.type == "cpu" and active_BTH.dtype == torch.bool and active_BTH.stride(-1) == 1 and \
            positions_BT.dtype == torch.int64 and positions_BT.device.type == "cpu" and cpu_kernels.available():
        r = cpu_kernels.head_rows(active_BTH, heads, M, positions_BT)
        return HeadRows(heads, r["tokens"], r["valid"], r["flat"], r["positions"], r["gate_index"])
    used = active_BTH[..., heads].transpose(1, 2)  # (B, P, T)
    count = used.sum(-1).view(-1)  # (B*P,)
    b, p, t = used.nonzero(as_tuple=True)  # ascending t within each (b, p)
    bp = b * P + p
    rank = torch.arange(t.numel(), device=device) - (count.cumsum(0) - count)[bp]  # t's place among its (b, p)'s
    tokens = torch.full((B, P, M), T - 1, dtype=torch.int64, device=device)
    tokens.view(-1)[bp * M + rank] = t
    valid = torch.arange(M, device=device) < count.view(B, P, 1)  # (B, P, M)
    flat = tokens + (torch.arange(B, device=device) * T)[:, None, None]
    positions = positions_BT.gather(1, tokens.view(B, -1)).view(B, P, M)
    return HeadRows(heads, tokens, valid, flat, positions)


def rows_mask(key_mask: Optional[Tensor], rows: HeadRows) -> Optional[Tensor]:
    """The rows' own (B, P, M, S) mask when the layer's mask is per query (B, T, S); None for a
    key-padding mask (B, 1, S) (kernels apply it to every row) or no mask."""
    if key_mask is None or key_mask.shape[1] == 1:
        return None
    B, P, M = rows.tokens_BPM.shape
    idx = rows.tokens_BPM.view(B, -1, 1).expand(B, P * M, key_mask.shape[-1])
    return key_mask.gather(1, idx).view(B, P, M, -1)


def row_gates(gates_BTH: Tensor, rows: HeadRows) -> Tensor:
    """(B, P, M) router weight of every row, 0 on padding."""
    if rows.gate_index_BPM is not None:  # take: indices into (B, T, H) in logical order, any strides
        return torch.take(gates_BTH, rows.gate_index_BPM) * rows.valid_BPM
    return gates_BTH[..., rows.heads].transpose(1, 2).gather(2, rows.tokens_BPM) * rows.valid_BPM


def kv_for_heads(k: Tensor, v: Tensor, heads: list[int], num_heads: int) -> tuple[Tensor, Tensor]:
    """Keys/values read by query ``heads``, (B, P, S, hd): a view for a contiguous run without
    grouped-query attention, else one gather along the head axis."""
    G = k.shape[1]
    if G == num_heads and heads == list(range(heads[0], heads[-1] + 1)):
        return k[:, heads[0] : heads[-1] + 1], v[:, heads[0] : heads[-1] + 1]
    g = torch.tensor([h // (num_heads // G) for h in heads], device=k.device)
    return k.index_select(1, g), v.index_select(1, g)
