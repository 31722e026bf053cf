"""Routing statistics of a trained model, collected with forward hooks on every MoHAttention.

Shape legend: L attention layers (in ``model.modules()`` order), G groups (classes, ...),
H heads, E routed heads, B batch, T tokens.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from moh.core.attention import MoHAttention, MoHOutput
from moh.core.routing import Routing

log = logging.getLogger(__name__)

GroupFn = Callable[[dict], Tensor]


@dataclass
class RoutingRecord:
    """Counts over every counted token; the fractions are derived from them."""

    group_names: list[str]
    active_LGH: Tensor  # float64: tokens of group g that used head h in layer l
    tokens_LG: Tensor  # float64: tokens of group g seen by layer l
    entropy_sum_L: Tensor  # float64: sum over tokens of the router entropy (nats)
    entropy_tokens_L: Tensor  # float64: tokens that had router probabilities
    num_shared: list[int]  # per layer
    num_routed: list[int]  # per layer: E
    expected_fraction: list[float]  # per layer: heads per token by configuration / H
    batches: int = 0
    layer_names: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return self.active_LGH.shape[0]

    @property
    def head_load(self) -> Tensor:
        """(L, G, H): fraction of group g's tokens that use head h in layer l (nan: no tokens)."""
        return (self.active_LGH / self.tokens_LG.unsqueeze(-1)).float()

    @property
    def routed_counts(self) -> Tensor:
        """(L, H): how many tokens chose each head (shared heads: every token)."""
        return self.active_LGH.sum(1)

    @property
    def choice_fraction(self) -> Tensor:
        """(L, H): fraction of all counted tokens that use each head."""
        return (self.routed_counts / self.tokens_LG.sum(1, keepdim=True)).float()

    @property
    def entropy(self) -> Tensor:
        """(L,): mean router entropy in nats over tokens (nan for layers without probabilities)."""
        return (self.entropy_sum_L / self.entropy_tokens_L).float()

    @property
    def active_fraction(self) -> Tensor:
        """(L,): measured fraction of (token, head) pairs computed."""
        H = self.active_LGH.shape[-1]
        return (self.active_LGH.sum((1, 2)) / (self.tokens_LG.sum(1) * H)).float()

    def summary(self) -> dict:
        """Plain numbers (JSON-ready; nan becomes None)."""

        def clean(t: Tensor) -> list:
            return [[clean_one(v) for v in row] if isinstance(row, list) else clean_one(row) for row in t.tolist()]

        def clean_one(v):
            if isinstance(v, list):
                return [clean_one(u) for u in v]
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)

        return {
            "group_names": self.group_names,
            "layers": self.layer_names,
            "batches": self.batches,
            "tokens_per_group": self.tokens_LG[0].long().tolist() if self.num_layers else [],
            "num_shared": self.num_shared,
            "num_routed": self.num_routed,
            "expected_active_fraction": self.expected_fraction,
            "active_fraction": clean(self.active_fraction),
            "entropy_nats": clean(self.entropy),
            "max_entropy_nats": [math.log(e) if e > 1 else 0.0 for e in self.num_routed],
            "choice_fraction": clean(self.choice_fraction),
            "head_load": clean(self.head_load),
        }


def attention_layers(model: nn.Module) -> list[tuple[str, MoHAttention]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoHAttention)]


def _token_groups(group: Optional[Tensor], B: int, T: int) -> Tensor:
    """Per-sample (B,) or per-token (B, T) groups -> (B, T) long."""
    if group is None:
        return torch.zeros(B, T, dtype=torch.long)
    group = torch.as_tensor(group).long().cpu()
    if group.shape == (B,):
        return group[:, None].expand(B, T)
    if group.shape == (B, T):
        return group
    raise ValueError(f"group_fn returned shape {tuple(group.shape)}; expected (B,)={(B,)} or (B, T)={(B, T)}")


def _grow(t: Tensor, dim: int, size: int) -> Tensor:
    """Zero-pad ``t`` along ``dim`` to ``size`` (groups appear as they are seen)."""
    if t.shape[dim] >= size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim)


@torch.no_grad()
def collect_routing(
    model: nn.Module,
    batches: Iterable[dict],
    group_fn: Optional[GroupFn] = None,
    group_names: Optional[Sequence[str]] = None,
    max_batches: int = 0,
) -> RoutingRecord:
    """Run ``model(**batch)`` over ``batches`` (eval mode, no grad) and count, per attention
    layer and group, which heads every token used.

    ``group_fn(batch)`` gives each sample (B,) or token (B, T) a group id; -1 leaves it out;
    None puts everything in one group "all". Tokens where the output's ``token_mask`` is False
    (padding) are left out. Hooks are removed and the training mode restored afterwards."""
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoHAttention layers to analyse")
    L = len(layers)
    H = max(m.cfg.num_heads for _, m in layers)
    G = len(group_names) if group_names is not None else (1 if group_fn is None else 0)
    active = torch.zeros(L, G, H, dtype=torch.float64)
    tokens = torch.zeros(L, G, dtype=torch.float64)
    ent_sum = torch.zeros(L, dtype=torch.float64)
    ent_n = torch.zeros(L, dtype=torch.float64)

    calls: list[tuple[int, Routing]] = []

    def make_hook(idx: int):
        def hook(module, args, output):
            if isinstance(output, MoHOutput):
                calls.append((idx, output.routing))

        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, (_, m) in enumerate(layers)]
    was_training = model.training
    model.eval()
    n_batches = 0
    try:
        for batch in batches:
            if max_batches and n_batches >= max_batches:
                break
            calls.clear()
            out = model(**batch)
            mask = getattr(out, "token_mask", None)
            group = group_fn(batch) if group_fn is not None else None
            for idx, r in calls:
                B, T, Hl = r.active_BTH.shape
                g_BT = _token_groups(group, B, T)
                keep_BT = g_BT >= 0
                if mask is not None and tuple(mask.shape) == (B, T):
                    keep_BT &= mask.bool().cpu()
                if G == 0 or int(g_BT.max()) >= active.shape[1]:  # groups discovered as they come
                    if group_names is not None:
                        raise ValueError(f"group id {int(g_BT.max())} >= len(group_names)={len(group_names)}")
                    size = int(g_BT.max()) + 1
                    active, tokens = _grow(active, 1, size), _grow(tokens, 1, size)
                _count(idx, r, g_BT, keep_BT, active, tokens, ent_sum, ent_n)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    names = list(group_names) if group_names is not None else (["all"] if group_fn is None else [str(i) for i in range(active.shape[1])])
    cfgs = [m.cfg for _, m in layers]
    return RoutingRecord(
        group_names=names, active_LGH=active, tokens_LG=tokens, entropy_sum_L=ent_sum, entropy_tokens_L=ent_n,
        num_shared=[c.num_heads if c.router == "all" else c.num_shared for c in cfgs],
        num_routed=[0 if c.router == "all" else c.num_routed for c in cfgs],
        expected_fraction=[c.active_fraction for c in cfgs], batches=n_batches, layer_names=[n for n, _ in layers],
    )


def _count(idx: int, r: Routing, g_BT: Tensor, keep_BT: Tensor, active: Tensor, tokens: Tensor,
           ent_sum: Tensor, ent_n: Tensor) -> None:
    """Add one layer call's routing to the running counts (in place)."""
    g = g_BT[keep_BT]  # (n,) group of each kept token
    act_nH = r.active_BTH.cpu()[keep_BT].double()  # (n, Hl)
    Hl = act_nH.shape[1]
    active[idx, :, :Hl].index_add_(0, g, act_nH)
    tokens[idx].index_add_(0, g, torch.ones_like(g, dtype=torch.float64))
    if r.probs_BTE is not None and r.probs_BTE.shape[-1] > 0:
        p = r.probs_BTE.detach().cpu().double()[keep_BT]  # (n, E)
        ent_sum[idx] += -(p * p.clamp_min(1e-30).log()).sum()
        ent_n[idx] += p.shape[0]
