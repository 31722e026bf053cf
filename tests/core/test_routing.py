"""Load-balance loss L_b = E * sum_i f_i P_i (paper Eq. 7) and routing statistics."""
from __future__ import annotations

import torch

from moh.config import MoHConfig
from moh.core.routers import build_router
from moh.core.routing import Routing, load_balance_loss, total_load_balance_loss


def routing_from(probs_BTE: torch.Tensor, top_k: int, num_shared: int = 1) -> Routing:
    B, T, E = probs_BTE.shape
    idx = probs_BTE.topk(top_k, dim=-1).indices
    active = torch.zeros(B, T, num_shared + E, dtype=torch.bool)
    active[..., :num_shared] = True
    active[..., num_shared:].scatter_(-1, idx, True)
    return Routing(active.float(), active, probs_BTE, num_shared=num_shared, learned=True)


def test_hand_example():
    # two tokens, E = 3 routed heads, top-1
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]])
    f = torch.tensor([0.5, 0.0, 0.5])  # token 0 picks head 0, token 1 head 2
    P = torch.tensor([0.4, 0.25, 0.35])
    expected = 3 * (f * P).sum()  # = 3 * (0.2 + 0.175) = 1.125
    torch.testing.assert_close(load_balance_loss(routing_from(probs, 1)), expected)
    torch.testing.assert_close(expected, torch.tensor(1.125))


def test_uniform_probs_give_k():
    E, k = 6, 2
    probs = torch.full((2, 4, E), 1.0 / E)
    r = routing_from(probs, k)
    torch.testing.assert_close(load_balance_loss(r), torch.tensor(float(k)))


def test_gradient_reaches_only_the_router():
    torch.manual_seed(0)
    cfg = MoHConfig(dim=8, num_heads=5, head_dim=2, num_shared=1, top_k=2)
    r = build_router(cfg)
    x = torch.randn(2, 6, 8, requires_grad=True)
    out = r(x, lambda: None)
    loss = load_balance_loss(out)
    loss.backward()
    assert r.w_routed.weight.grad.abs().sum() > 0
    assert r.w_balance.weight.grad is None and r.w_shared is None  # gates are not in the loss
    # f carries no gradient: the loss equals E * sum(f.detach() * P), so d loss / d P = E * f
    probs = out.probs_BTE.detach().requires_grad_(True)
    loss2 = load_balance_loss(Routing(out.gates_BTH, out.active_BTH, probs, 1, True))
    (g,) = torch.autograd.grad(loss2, probs)
    f = out.active_BTH[..., 1:].float().mean((0, 1))
    torch.testing.assert_close(g, (4 * f / 12).expand(2, 6, 4))


def test_padding_tokens_excluded():
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.0, 0.0, 1.0]]])
    keep = torch.tensor([[True, True, False]])
    masked = load_balance_loss(routing_from(probs, 1), keep)
    torch.testing.assert_close(masked, load_balance_loss(routing_from(probs[:, :2], 1)))
    assert not torch.allclose(masked, load_balance_loss(routing_from(probs, 1)))


def test_unlearned_routers_give_zero_and_mean_over_layers():
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]])
    learned = routing_from(probs, 1)
    fixed = Routing(torch.ones(1, 2, 4), torch.ones(1, 2, 4, dtype=torch.bool), None, 4, False)
    assert load_balance_loss(fixed).item() == 0
    torch.testing.assert_close(total_load_balance_loss([learned, fixed]), load_balance_loss(learned))
    assert learned.active_fraction() == 0.5
    assert learned.active_fraction(torch.tensor([[True, False]])) == 0.5
