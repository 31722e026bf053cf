"""gather_bmm against plain index_select + bmm: same values, same gradients, less saved memory."""
from __future__ import annotations

import torch

from moh.layers.projection import gather_bmm


def _inputs(dtype=torch.float64):
    torch.manual_seed(0)
    x = torch.randn(10, 6, dtype=dtype, requires_grad=True)
    rows = torch.tensor([[[0, 3, 3, 9], [1, 2, 5, 7]], [[4, 4, 4, 8], [0, 1, 2, 3]]])  # (B=2, P=2, M=4), repeats
    w = torch.randn(2, 6, 5, dtype=dtype, requires_grad=True)
    return x, rows, w


def test_matches_index_select_bmm_and_gradcheck():
    x, rows, w = _inputs()
    y = gather_bmm(x, rows, w)
    ref = x.index_select(0, rows.reshape(-1)).view(2, 2, 4, 6) @ w
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad((y * g).sum(), (x, w))
    rx, rw = torch.autograd.grad((ref * g).sum(), (x, w))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    assert torch.autograd.gradcheck(lambda a, b: gather_bmm(a, rows, b), (x, w))


def test_saves_no_gathered_copy():
    """What autograd keeps for backward: the input, indices and weight, not the gathered rows."""
    x, rows, w = _inputs(torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        gather_bmm(x, rows, w)
    gathered = rows.numel() * x.shape[1]
    assert gathered not in saved and sum(saved) == x.numel() + rows.numel() + w.numel()
