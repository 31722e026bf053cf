"""The routing decision: which heads each token uses and with which weight.

Shape legend: B batch, T tokens, H heads, E routed heads (H - num_shared), K top-k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.utils._pytree as pytree
from torch import Tensor


@dataclass
class Routing:
    """What a router decided for one layer call.

    gates_BTH:  weight g of every (token, head); exactly 0 where the head is not used.
    active_BTH: bool, True where the token uses the head (shared heads always True).
    probs_BTE:  router probabilities over the routed heads (for the load-balance loss and
                analysis); None when the router has none.
    learned:    True when ``probs_BTE`` carries gradient to trainable router parameters.
    num_shared: the first ``num_shared`` heads are shared.
    """

    gates_BTH: Tensor
    active_BTH: Tensor
    probs_BTE: Optional[Tensor]
    num_shared: int
    learned: bool = False

    @property
    def num_heads(self) -> int:
        return self.gates_BTH.shape[-1]

    def active_fraction(self, token_mask_BT: Optional[Tensor] = None) -> float:
        """Measured fraction of (token, head) pairs computed."""
        active = self.active_BTH.float()
        if token_mask_BT is None:
            return active.mean().item()
        m = token_mask_BT.to(active.dtype).unsqueeze(-1)
        return ((active * m).sum() / (m.sum() * active.shape[-1]).clamp_min(1)).item()

    def detach(self) -> "Routing":
        probs = None if self.probs_BTE is None else self.probs_BTE.detach()
        return Routing(self.gates_BTH.detach(), self.active_BTH, probs, self.num_shared, self.learned)


RawQueries = Callable[[], Tensor]  # lazily the full query projection (B, T, H, hd), before qk-norm / RoPE


def scatter_topk(values_BTK: Tensor, index_BTK: Tensor, num_shared: int, shared_BTS: Tensor, H: int):
    """Dense gates (B, T, H) and the active mask from shared gates (B, T, num_shared) and the
    routed top-k (values and indices among the routed heads, (B, T, K)): what routers return."""
    B, T, _ = values_BTK.shape
    routed = values_BTK.new_zeros(B, T, H - num_shared).scatter(-1, index_BTK, values_BTK)
    gates = torch.cat([shared_BTS, routed], dim=-1)
    active = torch.zeros(B, T, H, dtype=torch.bool, device=values_BTK.device)
    active[..., :num_shared] = True
    active[..., num_shared:].scatter_(-1, index_BTK, True)
    return gates, active


# a pytree node (tensors as leaves, the two constants as context): torch.export and
# torch.compile can return it
pytree.register_pytree_node(
    Routing,
    lambda r: ([r.gates_BTH, r.active_BTH, r.probs_BTE], (r.num_shared, r.learned)),
    lambda leaves, ctx: Routing(*leaves, num_shared=ctx[0], learned=ctx[1]),
    serialized_type_name="moh.core.routing.Routing",
    flatten_with_keys_fn=lambda r: ([(pytree.GetAttrKey(k), getattr(r, k)) for k in ("gates_BTH", "active_BTH", "probs_BTE")],
                                    (r.num_shared, r.learned)),
)


def load_balance_loss(routing: Routing, token_mask_BT: Optional[Tensor] = None) -> Tensor:
    """L_b = E * sum_i f_i * P_i over the routed heads (paper Eq. 7).

    f_i: fraction of tokens whose top-k includes routed head i (no gradient);
    P_i: mean router probability of routed head i. Padding tokens (``token_mask_BT`` False) are
    left out. Returns 0 for routers without learned probabilities.
    """
    probs = routing.probs_BTE
    if probs is None or not routing.learned or probs.shape[-1] == 0:
        return routing.gates_BTH.new_zeros(())
    E = probs.shape[-1]
    chosen = routing.active_BTH[..., routing.num_shared :].to(probs.dtype)
    if token_mask_BT is None:
        f = chosen.reshape(-1, E).mean(0)
        P = probs.reshape(-1, E).mean(0)
    else:
        m = token_mask_BT.to(probs.dtype).unsqueeze(-1)
        n = m.sum().clamp_min(1)
        f = (chosen * m).reshape(-1, E).sum(0) / n
        P = (probs * m).reshape(-1, E).sum(0) / n
    return E * (f.detach() * P).sum()


def total_load_balance_loss(routings: list[Routing], token_mask_BT: Optional[Tensor] = None) -> Tensor:
    """Mean of the per-layer load-balance losses (layers without learned routers count 0)."""
    losses = [load_balance_loss(r, token_mask_BT) for r in routings if r.learned]
    if not losses:
        return routings[0].gates_BTH.new_zeros(()) if routings else torch.zeros(())
    return torch.stack(losses).mean()
