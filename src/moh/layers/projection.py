"""The per-head query and output projections of an MoH layer, as backends see them.

A backend never touches the attention module or its weights. ``MoHAttention`` hands it a
``QueryProjection`` (queries of chosen heads, for all tokens or for chosen rows, after qk-norm and
RoPE) and an ``OutputProjection`` (sum over heads of gated head outputs times W_O^h, plus the bias
once). Both are built per call from the module's *current* submodules, so a projection replaced
after construction (a PEFT LoRA layer, a quantised or tensor-parallel linear) is what runs.

Two ways to compute, chosen by ``sliceable``:

* a plain ``nn.Linear`` (no forward override, no hooks, a dense weight): per-head slices of the
  weight, so only the selected (row, head) pairs are projected — the work MoH saves;
* any other module: the module itself on every row (queries) or on the dense, zero-filled head
  outputs (output projection). Exact for any module that is a function of its input rows, at the
  cost of the projection savings (attention is still skipped where unused).

Shape legend: B batch, T tokens, D model width, H heads, P heads of a group, M rows per head,
hd head width, n = B*T flattened rows.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moh.layers.rope import apply_rope


def sliceable(module: nn.Module) -> bool:
    """True when ``module`` computes exactly ``F.linear(x, weight, bias)`` with a dense weight, so
    per-head slices of its weight give per-head slices of its output."""
    return (
        isinstance(module, nn.Linear)
        and type(module).forward is nn.Linear.forward
        and not module._forward_hooks and not module._forward_pre_hooks
        and type(module.weight) in (nn.Parameter, Tensor)
    )


class QueryProjection:
    """Queries of one layer call: x (B, T, D) -> per-head queries (.., hd) after qk-norm and RoPE.

    ``raw()`` is the full projection (B, T, H, hd) before qk-norm/RoPE, made at most once (the
    ``query_norm`` router asks for it; once made, every query a backend asks for is a slice of
    it instead of a new projection). ``has_raw`` tells whether it was made."""

    def __init__(self, q_proj: nn.Module, x_BTD: Tensor, positions_BT: Tensor, num_heads: int, head_dim: int,
                 q_norm: Optional[nn.Module] = None, rotary: Optional[nn.Module] = None):
        self.proj, self.x, self.positions = q_proj, x_BTD, positions_BT
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q_norm, self.rotary = q_norm, rotary
        self.sliceable = sliceable(q_proj)
        self._raw: Optional[Tensor] = None

    @property
    def has_raw(self) -> bool:
        return self._raw is not None

    def raw(self) -> Tensor:
        if self._raw is None:
            B, T, _ = self.x.shape
            self._raw = self.proj(self.x).view(B, T, self.num_heads, self.head_dim)
        return self._raw

    def heads(self, h0: int, h1: int, *, reuse: bool = True) -> Tensor:
        """Queries of heads h0..h1-1 for every token -> (B, T, P, hd). ``reuse=False`` projects
        anew even when ``raw()`` exists (the reference backend: the reuse is tested against it)."""
        if self.has_raw and reuse or not self.sliceable:
            q = self.raw()[:, :, h0:h1]
        else:
            H, hd, D = self.num_heads, self.head_dim, self.x.shape[-1]
            w = self.proj.weight.view(H, hd, D)[h0:h1].reshape(-1, D)
            b = None if self.proj.bias is None else self.proj.bias.view(H, hd)[h0:h1].reshape(-1)
            q = F.linear(self.x, w, b).unflatten(-1, (h1 - h0, hd))
        return self._norm_rope(q, self.positions.unsqueeze(-1))

    def rows(self, heads: list[int], tokens_BPM: Tensor, positions_BPM: Tensor) -> Tensor:
        """Queries of head ``heads[p]`` for tokens ``tokens_BPM[b, p]`` (indices within item b)
        -> (B, P, M, hd), after qk-norm and RoPE at ``positions_BPM``."""
        B, T, D = self.x.shape
        H, hd = self.num_heads, self.head_dim
        P, M = tokens_BPM.shape[1:]
        if self.has_raw or not self.sliceable:
            head = torch.tensor(heads, device=tokens_BPM.device)[None, :, None]
            flat = ((torch.arange(B, device=tokens_BPM.device)[:, None, None] * T + tokens_BPM) * H + head).view(-1)
            q = self.raw().reshape(B * T * H, hd).index_select(0, flat).view(B, P, M, hd)
        else:
            rows = tokens_BPM + (torch.arange(B, device=tokens_BPM.device) * T)[:, None, None]  # into B*T
            w = self.proj.weight.view(H, hd, D)[heads]  # (P, hd, D)
            q = gather_bmm(self.x.reshape(B * T, D), rows, w.transpose(1, 2))
            if self.proj.bias is not None:
                q = q + self.proj.bias.view(H, hd)[heads][:, None]
        return self._norm_rope(q, positions_BPM)

    def _norm_rope(self, q: Tensor, positions: Tensor) -> Tensor:
        """qk-norm and RoPE of queries q (..., hd); ``positions`` broadcast to q's leading shape."""
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.rotary is not None:
            cos, sin = self.rotary.cos_sin(positions, q.dtype)
            q = apply_rope(q, cos, sin)
        return q


class OutputProjection:
    """sum_h (gated head output h) W_O^h + bias, for head outputs given whole or by rows.

    ``dense(heads_BTHd)``: all heads at once (zeros for unused ones). For pieces, ``start(B, T)``
    returns an accumulator: ``add_heads`` (heads h0..h1-1 for every token), ``add_rows`` (chosen
    rows of chosen heads), then ``finish()`` -> (B, T, D) with the bias added once."""

    def __init__(self, o_proj: nn.Module, num_heads: int, head_dim: int):
        self.proj, self.num_heads, self.head_dim = o_proj, num_heads, head_dim
        self.sliceable = sliceable(o_proj)

    def dense(self, heads_BTHd: Tensor) -> Tensor:
        return self.proj(heads_BTHd.flatten(-2))

    def start(self, B: int, T: int) -> "_Accumulator":
        return (_SlicedSum if self.sliceable else _DenseHeads)(self, B, T)


class _SlicedSum:
    """Plain linear W_O: each piece is projected with its heads' weight columns and summed into the
    (n, D) output: no work for unused (row, head) pairs."""

    def __init__(self, op: OutputProjection, B: int, T: int):
        self.op, self.B, self.T = op, B, T
        self.out: Optional[Tensor] = None  # (B, T, D), made by the first piece (its dtype: autocast's)

    def add_heads(self, h0: int, h1: int, y_BTPd: Tensor) -> None:
        hd = self.op.head_dim
        y = y_BTPd.reshape(self.B, self.T, -1) @ self.op.proj.weight[:, h0 * hd : h1 * hd].T
        self.out = y if self.out is None else self.out + y.to(self.out.dtype)

    def add_rows(self, heads: list[int], rows_BPM: Tensor, y_BPMd: Tensor) -> None:
        """rows_BPM: indices into the n = B*T flattened rows; y (B, P, M, hd)."""
        w = self.op.proj.weight
        D = w.shape[0]
        # (P, hd, D), made contiguous (a small copy): bmm on the permuted view is many times slower
        w_out = w.view(D, self.op.num_heads, self.op.head_dim)[:, heads].permute(1, 2, 0).contiguous()
        y = (y_BPMd @ w_out).reshape(-1, D)
        if self.out is None:
            self.out = y.new_zeros(self.B, self.T, D)
        self.out = self.out.view(-1, D).index_add_(0, rows_BPM.reshape(-1), y.to(self.out.dtype)).view(self.B, self.T, D)

    def finish(self) -> Tensor:
        w, b = self.op.proj.weight, self.op.proj.bias
        out = w.new_zeros(self.B, self.T, w.shape[0]) if self.out is None else self.out
        return out if b is None else out + b


class _DenseHeads:
    """Any other W_O module: pieces are written into dense (B, T, H, hd) head outputs, zeros for
    unused pairs, and the module runs once on them."""

    def __init__(self, op: OutputProjection, B: int, T: int):
        self.op, self.B, self.T = op, B, T
        self.heads: Optional[Tensor] = None  # (n, H, hd)

    def _buffer(self, like: Tensor) -> Tensor:
        if self.heads is None:
            self.heads = like.new_zeros(self.B * self.T, self.op.num_heads, self.op.head_dim)
        return self.heads

    def add_heads(self, h0: int, h1: int, y_BTPd: Tensor) -> None:
        buf = self._buffer(y_BTPd)
        piece = torch.zeros_like(buf)
        piece[:, h0:h1] = y_BTPd.reshape(-1, h1 - h0, self.op.head_dim).to(buf.dtype)
        self.heads = buf + piece

    def add_rows(self, heads: list[int], rows_BPM: Tensor, y_BPMd: Tensor) -> None:
        buf = self._buffer(y_BPMd)
        H, hd = self.op.num_heads, self.op.head_dim
        head = torch.tensor(heads, device=rows_BPM.device)[None, :, None]
        flat = (rows_BPM * H + head).reshape(-1)  # into (n * H) (row, head) pairs
        self.heads = buf.view(-1, hd).index_add(0, flat, y_BPMd.reshape(-1, hd).to(buf.dtype)).view_as(buf)

    def finish(self) -> Tensor:
        if self.heads is None:
            p = next(self.op.proj.parameters(), None)
            self.heads = torch.zeros(self.B * self.T, self.op.num_heads, self.op.head_dim,
                                     dtype=None if p is None else p.dtype, device=None if p is None else p.device)
        return self.op.dense(self.heads.view(self.B, self.T, self.op.num_heads, self.op.head_dim))


_Accumulator = _SlicedSum | _DenseHeads


# ---------------------------------------------------------------------------------------------
# gathered rows times a weight per head, without keeping the gathered rows for backward


class _GatherBmm(torch.autograd.Function):
    """Autograd through ``index_select`` + ``bmm`` would save the gathered rows (a copy of the
    input row for every head that uses it: at 50% heads, N=2048, D=768 about 25 MB per layer) for
    the weight gradient. Here the backward gathers them again from the input, which autograd keeps
    anyway."""

    @staticmethod
    def forward(ctx, x_nD: Tensor, rows_BPM: Tensor, w_PDo: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x_nD, rows_BPM, w_PDo)
        return _gather(x_nD, rows_BPM) @ w_PDo

    @staticmethod
    def backward(ctx, dy_BPMo: Tensor):  # type: ignore[override]
        x_nD, rows_BPM, w_PDo = ctx.saved_tensors
        dy_BPMo = dy_BPMo.to(w_PDo.dtype)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx_rows = (dy_BPMo @ w_PDo.transpose(1, 2)).reshape(-1, x_nD.shape[1])
            dx = torch.zeros_like(x_nD).index_add_(0, rows_BPM.reshape(-1), dx_rows.to(x_nD.dtype))
        if ctx.needs_input_grad[2]:
            dw = (_gather(x_nD, rows_BPM).transpose(-1, -2) @ dy_BPMo).sum(0)  # rows gathered again
        return dx, None, dw


def _gather(x_nD: Tensor, rows_BPM: Tensor) -> Tensor:
    """(n, D) rows at (B, P, M) indices -> (B, P, M, D)."""
    return x_nD.index_select(0, rows_BPM.reshape(-1)).view(*rows_BPM.shape, x_nD.shape[1])


def gather_bmm(x_nD: Tensor, rows_BPM: Tensor, w_PDo: Tensor) -> Tensor:
    """``x_nD[rows_BPM[b, p, m]] @ w_PDo[p]``: x (n, D), rows (B, P, M) indices into n,
    w (P, D, o) -> (B, P, M, o). Same values and gradients as ``index_select`` then ``@``.
    Under autocast both operands are cast to the autocast dtype first (as autocast does for a
    matmul), so forward and backward agree on one dtype."""
    device = x_nD.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return _GatherBmm.apply(x_nD.to(dtype), rows_BPM, w_PDo.to(dtype))
    return _GatherBmm.apply(x_nD, rows_BPM, w_PDo)
