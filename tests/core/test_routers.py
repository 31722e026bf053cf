"""Router gate formulas checked by hand against the paper (arXiv 2410.11842, Eqs. 4-6 and Sec. 4.4)."""
from __future__ import annotations

import math

import torch

from moh.config import MoHConfig
from moh.core.routers import build_router


def router(**kw):
    kw.setdefault("head_dim", 2)
    torch.manual_seed(0)
    return build_router(MoHConfig(**kw))


def no_queries():
    raise AssertionError("this router must not ask for queries")


def test_two_stage_gates_by_hand():
    """H=5: 2 shared, 3 routed, top-2. Router weights chosen so the logits are known numbers."""
    r = router(dim=3, num_heads=5, head_dim=2, num_shared=2, top_k=2)
    x = torch.tensor([[[1.0, 0.0, 0.0]]])  # picks column 0 of every router weight
    with torch.no_grad():
        r.w_routed.weight.zero_()
        r.w_routed.weight[:, 0] = torch.tensor([1.0, 2.0, 0.0])  # routed logits
        r.w_shared.weight.zero_()
        r.w_shared.weight[:, 0] = torch.tensor([0.0, 1.0])  # shared logits
        r.w_balance.weight.zero_()
        r.w_balance.weight[:, 0] = torch.tensor([0.5, -0.5])  # balance logits
    out = r(x, no_queries)

    e = math.exp
    p = torch.tensor([e(1.0), e(2.0), e(0.0)]) / (e(1.0) + e(2.0) + e(0.0))  # softmax over routed
    top = torch.tensor([p[0], p[1]]) / (p[0] + p[1]) * 2  # renormalised top-2, times k
    shared = torch.tensor([1.0, e(1.0)]) / (1 + e(1.0)) * 2  # softmax times num_shared
    a = torch.tensor([e(0.5), e(-0.5)]) / (e(0.5) + e(-0.5)) * 2  # balance softmax times 2
    expected = torch.tensor([shared[0] * a[0], shared[1] * a[0], top[0] * a[1], top[1] * a[1], 0.0])
    torch.testing.assert_close(out.gates_BTH[0, 0], expected, atol=1e-6, rtol=1e-6)
    assert out.active_BTH[0, 0].tolist() == [True, True, True, True, False]
    torch.testing.assert_close(out.probs_BTE[0, 0], p, atol=1e-6, rtol=1e-6)
    assert out.learned and out.num_shared == 2


def test_two_stage_uniform_gates_are_one():
    r = router(dim=4, num_heads=6, num_shared=2)
    for p in r.parameters():
        torch.nn.init.zeros_(p)
    out = r(torch.randn(3, 5, 4), no_queries)
    assert torch.equal(out.gates_BTH, torch.ones(3, 5, 6))
    assert out.active_BTH.all()


def test_two_stage_without_shared_and_without_routed():
    """0 shared: no balance / shared weights; gates are top-k renormalised times k only."""
    r = router(dim=4, num_heads=4, num_shared=0, top_k=2)
    assert r.w_shared is None and r.w_balance is None
    out = r(torch.randn(2, 3, 4), no_queries)
    torch.testing.assert_close(out.gates_BTH.sum(-1), torch.full((2, 3), 2.0))
    assert (out.active_BTH.sum(-1) == 2).all()
    assert torch.equal(out.active_BTH, out.gates_BTH > 0)
    r = router(dim=4, num_heads=3, head_dim=2, num_shared=3)  # only shared heads: gates softmax * 3
    out = r(torch.randn(2, 3, 4), no_queries)
    torch.testing.assert_close(out.gates_BTH.sum(-1), torch.full((2, 3), 3.0))
    assert out.probs_BTE is None and not out.learned


def test_query_norm_by_hand():
    """logits = per-head query norm / std over routed heads; hard gates; shared always on."""
    r = router(dim=4, num_heads=4, head_dim=1, num_shared=1, top_k=1, router="query_norm")
    q = torch.tensor([[[[9.0], [3.0], [-4.0], [1.0]]]])  # (B=1, T=1, H=4, hd=1): routed norms 3, 4, 1
    out = r(torch.randn(1, 1, 4), lambda: q)
    norms = torch.tensor([3.0, 4.0, 1.0])
    expected_p = torch.softmax(norms / norms.std(), dim=-1)
    torch.testing.assert_close(out.probs_BTE[0, 0], expected_p)
    assert out.gates_BTH[0, 0].tolist() == [1.0, 0.0, 1.0, 0.0]  # shared + the largest norm
    assert out.active_BTH[0, 0].tolist() == [True, False, True, False]
    assert not out.learned


def test_all_router():
    r = router(dim=4, num_heads=3, head_dim=2, router="all")
    out = r(torch.randn(2, 5, 4), no_queries)
    assert torch.equal(out.gates_BTH, torch.ones(2, 5, 3)) and out.active_BTH.all()
    assert out.probs_BTE is None


def test_two_stage_one_product_equals_its_three_projections():
    """The router's projections run as one product of their concatenated weights when they are
    plain linears: same logits and gradients as each projection on its own, which is what runs
    when one of them is wrapped (a forward hook here, as an adapter would be)."""
    import moh.core.routers as routers

    r = router(dim=8, num_heads=6, num_shared=2, top_k=2)
    x = torch.randn(4, 9, 8)  # 36 tokens: fused from 32 on
    fused_calls = []
    real = routers._linears
    routers._linears = lambda *a: fused_calls.append(1) or real(*a)
    try:
        fused = r.logits(x)
        r.logits(x[:1, :5])  # 5 tokens: three products
    finally:
        routers._linears = real
    assert fused_calls == [1]
    separate = [r.w_routed(x), r.w_shared(x), r.w_balance(x)]
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b)
    out = r(x, no_queries)
    grads = torch.autograd.grad(out.gates_BTH.square().sum(), [r.w_routed.weight, r.w_shared.weight, r.w_balance.weight])
    calls = []
    r.w_shared.register_forward_hook(lambda mod, inp, o: calls.append(o.shape))
    hooked = r(x, no_queries)
    assert calls == [(4, 9, 2)]  # the wrapped projection ran as a module
    torch.testing.assert_close(hooked.gates_BTH, out.gates_BTH)
    grads_hooked = torch.autograd.grad(hooked.gates_BTH.square().sum(),
                                       [r.w_routed.weight, r.w_shared.weight, r.w_balance.weight])
    for a, b in zip(grads, grads_hooked):
        torch.testing.assert_close(a, b)
