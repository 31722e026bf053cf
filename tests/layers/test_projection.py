"""gather_matmuls against plain index_select + matmul: same values, same gradients, less saved
memory; the gated output projection against dense MHA-style arithmetic."""
from __future__ import annotations

import torch
from torch import nn

from moh.layers.projection import OutputProjection, gather_matmuls


def _inputs(dtype=torch.float64):
    torch.manual_seed(0)
    x = torch.randn(10, 6, dtype=dtype, requires_grad=True)
    w = torch.randn(3, 5, 6, dtype=dtype, requires_grad=True)  # (H, o, D): a linear weight per head
    groups = [([0, 2], torch.tensor([[[0, 3, 3, 9], [1, 2, 5, 7]], [[4, 4, 4, 8], [0, 1, 2, 3]]])),  # (B=2, P=2, M=4)
              ([1], torch.tensor([[[2, 6]], [[0, 9]]]))]  # (B=2, P=1, M=2)
    return x, w, groups


def _reference(x, w, groups):
    return [torch.stack([x.index_select(0, r[:, p].reshape(-1)).view(r.shape[0], r.shape[2], -1) @ w[h].T
                         for p, h in enumerate(heads)], 1) for heads, r in groups]


def test_matches_index_select_matmul_and_gradcheck():
    x, w, groups = _inputs()
    ys, refs = gather_matmuls(x, w, groups), _reference(x, w, groups)
    gs = [torch.randn_like(y) for y in ys]
    got = torch.autograd.grad(sum((y * g).sum() for y, g in zip(ys, gs)), (x, w))
    want = torch.autograd.grad(sum((y * g).sum() for y, g in zip(refs, gs)), (x, w))
    for a, b in zip(ys + list(got), refs + list(want)):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda a, b: gather_matmuls(a, b, groups), (x, w))


def test_saves_no_gathered_copy():
    """What autograd keeps for backward: the input, weight and indices, not the gathered rows."""
    x, w, groups = _inputs(torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        gather_matmuls(x, w, groups)
    assert sum(saved) == x.numel() + w.numel() + sum(r.numel() for _, r in groups)


def test_gated_output_pieces_equal_dense_projection():
    """Whole heads and gathered rows, gated, through one accumulator == the dense projection of
    the gated, zero-filled head outputs; gradients too (weight, bias, head outputs, gates)."""
    torch.manual_seed(1)
    B, T, H, hd, D = 2, 5, 4, 3, 7
    o_proj = nn.Linear(H * hd, D).double()
    full_y, full_g = torch.randn(B, T, 2, hd, dtype=torch.float64, requires_grad=True), torch.rand(B, T, 2, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([[[0, 2, 4], [1, 1, 1]], [[3, 4, 4], [0, 2, 3]]])  # (B, P=2, M=3) tokens, heads 2 and 3
    row_y = torch.randn(B, 2, 3, hd, dtype=torch.float64, requires_grad=True)
    row_g = torch.rand(B, 2, 3, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[[1, 1, 1], [1, 0, 0]], [[1, 1, 0], [1, 1, 1]]], dtype=torch.float64)  # padding: gate 0

    def sliced():
        acc = OutputProjection(o_proj, H, hd).start(B, T)
        acc.add_heads(0, 2, full_y, full_g)
        acc.add_rows([2, 3], rows + (torch.arange(B) * T)[:, None, None], row_y, row_g * valid)
        return acc.finish()

    def dense():
        heads = torch.cat([full_y * full_g[..., None], torch.zeros(B, T, 2, hd, dtype=torch.float64)], 2)
        for p, h in enumerate([2, 3]):
            index = (torch.arange(B)[:, None].expand(B, 3), rows[:, p], torch.full((B, 3), h))
            heads = heads.index_put(index, row_y[:, p] * (row_g[:, p] * valid[:, p])[..., None], accumulate=True)
        return o_proj(heads.flatten(-2))

    got, want = sliced(), dense()
    torch.testing.assert_close(got, want)
    leaves = (o_proj.weight, o_proj.bias, full_y, full_g, row_y, row_g)
    w = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad((got * w).sum(), leaves), torch.autograd.grad((want * w).sum(), leaves)):
        torch.testing.assert_close(a, b)
