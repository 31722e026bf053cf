"""What every model family shares: its output object and per-layer head schedules."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from torch import Tensor

from moh.core.routing import Routing, total_load_balance_loss


@dataclass
class ModelOutput:
    logits: Tensor
    loss: Optional[Tensor] = None  # the task loss (cross-entropy, ...), without the balance loss
    routings: list[Routing] = field(default_factory=list)  # one per layer
    token_mask: Optional[Tensor] = None  # (B, T) tokens that count for routing statistics
    cache: Optional[object] = None

    @property
    def aux_loss(self) -> Tensor:
        """Load-balance loss, mean over layers (paper Eq. 7); the trainer adds beta times it."""
        return total_load_balance_loss(self.routings, self.token_mask)

    def active_fraction(self) -> float:
        """Measured fraction of (token, head) pairs computed, over all layers."""
        if not self.routings:
            return 1.0
        return sum(r.active_fraction(self.token_mask) for r in self.routings) / len(self.routings)


def layer_heads(
    depth: int, num_heads: int, num_shared: int, top_k: Optional[int], schedule: Optional[Sequence[Sequence[int]]]
) -> list[tuple[int, int]]:
    """Per-layer (num_shared, top_k). ``schedule`` is None (same split everywhere) or ``depth``
    pairs [num_shared, top_k] (the paper's ViT-B-75 changes the split per stage)."""
    if schedule is None:
        k = num_heads - num_shared if top_k is None else top_k
        return [(num_shared, k)] * depth
    if len(schedule) != depth:
        raise ValueError(f"layer_heads has {len(schedule)} entries; the model has depth={depth}")
    out = []
    for i, pair in enumerate(schedule):
        if len(pair) != 2:
            raise ValueError(f"layer_heads[{i}]={list(pair)} must be [num_shared, top_k]")
        out.append((int(pair[0]), int(pair[1])))
    return out
