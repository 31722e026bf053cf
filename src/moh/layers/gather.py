"""``gather_bmm``: rows gathered from a matrix, times one weight per group, without keeping the
gathered rows for backward.

Autograd through ``index_select`` + ``bmm`` saves the gathered rows (a copy of the input row for
every head that uses it: at 50% heads, N=2048, D=768 about 25 MB per layer) for the weight
gradient. Here the backward gathers them again from the input, which autograd keeps anyway.
"""
from __future__ import annotations

import torch
from torch import Tensor


class _GatherBmm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_nD: Tensor, rows_BPM: Tensor, w_PDo: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x_nD, rows_BPM, w_PDo)
        return _gather(x_nD, rows_BPM) @ w_PDo

    @staticmethod
    def backward(ctx, dy_BPMo: Tensor):  # type: ignore[override]
        x_nD, rows_BPM, w_PDo = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx_rows = (dy_BPMo @ w_PDo.transpose(1, 2)).reshape(-1, x_nD.shape[1])
            dx = torch.zeros_like(x_nD).index_add_(0, rows_BPM.reshape(-1), dx_rows)
        if ctx.needs_input_grad[2]:
            dw = (_gather(x_nD, rows_BPM).transpose(-1, -2) @ dy_BPMo).sum(0)  # rows gathered again
        return dx, None, dw


def _gather(x_nD: Tensor, rows_BPM: Tensor) -> Tensor:
    """(n, D) rows at (B, P, M) indices -> (B, P, M, D)."""
    return x_nD.index_select(0, rows_BPM.reshape(-1)).view(*rows_BPM.shape, x_nD.shape[1])


def gather_bmm(x_nD: Tensor, rows_BPM: Tensor, w_PDo: Tensor) -> Tensor:
    """``x_nD[rows_BPM[b, p, m]] @ w_PDo[p]``: x (n, D), rows (B, P, M) indices into n,
    w (P, D, o) -> (B, P, M, o). Same values and gradients as ``index_select`` then ``@``."""
    return _GatherBmm.apply(x_nD, rows_BPM, w_PDo)
