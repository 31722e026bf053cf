"""What every model family shares: the head specification of its config, its output object and
the metrics convention the training engine relies on.

The one aux-loss convention of moh: a model adds its load-balance loss to its ``loss`` itself,
once, weighted by its config's ``aux_loss_coef`` (the Mixtral convention of transformers, where the
model adds ``router_aux_loss_coef * aux_loss``). The training engine minimises ``out.loss`` as it
is and never adds anything; ``task_loss`` and ``aux_loss`` are reported beside it for logging.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from moh.config import MoHConfig
from moh.core.routing import Routing, total_load_balance_loss

IGNORE_INDEX = -100
Number = Union[Tensor, float, int]


@dataclass
class HeadSpec:
    """The attention-head fields every family config shares (a base class of ``ViTConfig``,
    ``DecoderConfig``, ...). Each layer is an MoH layer with ``num_shared`` shared heads and the
    top ``top_k`` of the others (``layer_heads``: one [num_shared, top_k] pair per layer instead,
    or [num_heads, num_shared, top_k] where the head count changes per layer, as in the paper's
    MoH-DiT-L/XL: then set ``head_dim``); ``router="all"`` is plain multi-head attention."""

    num_heads: int = 8
    num_kv_heads: Optional[int] = None  # None: num_heads (no grouped-query attention)
    head_dim: Optional[int] = None  # None: dim // num_heads
    num_shared: int = 0
    top_k: Optional[int] = None  # None: every routed head
    layer_heads: Optional[list] = None  # per-layer [num_shared, top_k] or [num_heads, num_shared, top_k]
    router: str = "two_stage"  # a name in moh.ROUTERS
    backend: str = "sparse"  # a name in moh.BACKENDS
    qk_norm: bool = False
    attn_dropout: float = 0.0
    aux_loss_coef: float = 0.01  # beta: loss = task loss + beta * load-balance loss (paper Eq. 8)

    def check_sizes(self, *names: str) -> None:
        """``ValueError`` naming the first of the int fields ``names`` (plus ``mlp_ratio`` > 0 and
        dropout rates in [0, 1) where the config has them) that is out of range, then every
        layer's ``MoHConfig`` built once: a bad head field is named before any weight exists."""
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        ratio = getattr(self, "mlp_ratio", 1.0)
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not ratio > 0:
            raise ValueError(f"mlp_ratio={ratio!r} must be a number > 0")
        for name in ("dropout", "drop_path", "attn_dropout"):
            rate = getattr(self, name, 0.0)
            if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate < 1.0:
                raise ValueError(f"{name}={rate!r} must be in [0, 1)")
        self.attention_configs()

    def layer_configs(self, dim: int, depth: int, **fixed) -> list[MoHConfig]:
        """One ``MoHConfig`` per layer; ``fixed``: the family's own attention settings
        (causal, rope, biases, ...)."""
        if not isinstance(self.aux_loss_coef, (int, float)) or not self.aux_loss_coef >= 0:
            raise ValueError(f"aux_loss_coef={self.aux_loss_coef!r} must be a number >= 0")
        return [
            MoHConfig(dim=dim, num_heads=h, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                      num_shared=s, top_k=k, router=self.router, backend=self.backend, qk_norm=self.qk_norm,
                      dropout=self.attn_dropout, **fixed)
            for h, s, k in layer_head_layout(depth, self.num_heads, self.num_shared, self.top_k, self.layer_heads)
        ]


@dataclass
class ModelOutput:
    """What every moh model returns.

    loss:      what to minimise: ``task_loss + aux_loss_coef * aux_loss`` (None without targets).
    task_loss: the task's own loss (cross-entropy, diffusion MSE, ...), without the balance term.
    aux_loss:  the load-balance loss (paper Eq. 7), mean over layers with learned routers.
    logits:    (B, C) or (B, T, V); None for models that predict no classes (a denoiser).
    routings:  one ``Routing`` per layer.
    metrics:   name -> (sum, count): the engine sums both over batches and processes and reports
               sum / count (``standard_metrics`` makes the usual ones).
    """

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    task_loss: Optional[Tensor] = None
    aux_loss: Optional[Tensor] = None
    routings: list[Routing] = field(default_factory=list)
    metrics: dict[str, tuple[Number, Number]] = field(default_factory=dict)
    token_mask: Optional[Tensor] = None  # (B, T) tokens that count for routing statistics
    cache: Optional[object] = None

    def active_fraction(self) -> float:
        """Measured fraction of (token, head) pairs computed, over all layers."""
        return active_fraction(self.routings, self.token_mask)


pytree.register_dataclass(ModelOutput, serialized_type_name="moh.models.base.ModelOutput")  # torch.export


def active_fraction(routings: Sequence[Routing], token_mask: Optional[Tensor] = None) -> float:
    """Measured fraction of (token, head) pairs computed, mean over layers."""
    return float(_active_fraction(routings, token_mask))


def _active_fraction(routings: Sequence[Routing], token_mask: Optional[Tensor] = None) -> Tensor | float:
    """As ``active_fraction``, as a tensor (no host sync: the engine reads metrics once per step)."""
    if not routings:
        return 1.0
    fractions = []
    for r in routings:
        active = r.active_BTH.float()
        if token_mask is None:
            fractions.append(active.mean())
        else:
            m = token_mask.to(active.dtype).unsqueeze(-1)
            fractions.append((active * m).sum() / (m.sum() * active.shape[-1]).clamp_min(1))
    return torch.stack(fractions).mean()


def with_aux_loss(task_loss: Optional[Tensor], routings: Sequence[Routing], coef: float,
                  token_mask: Optional[Tensor] = None) -> tuple[Optional[Tensor], Tensor]:
    """(loss, aux_loss): the balance loss over ``routings`` and the loss to minimise, ``task_loss +
    coef * aux_loss`` (None without a task loss). The only place a model adds the balance term."""
    aux = total_load_balance_loss(list(routings), token_mask)
    if task_loss is None:
        return None, aux
    return (task_loss + coef * aux if coef else task_loss), aux


def accuracy_counts(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(correct, counted) predictions. Classifiers: logits (B, C) vs labels (B). Decoders: logits
    (B, T, V) vs labels (B, T), position t predicting labels[t + 1], -100 ignored."""
    if logits.dim() == 2:
        pred, target = logits.argmax(-1), labels
    elif logits.dim() == 3:
        pred, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    else:
        raise ValueError(f"logits must be (B, C) or (B, T, V), got shape {tuple(logits.shape)}")
    valid = target != IGNORE_INDEX
    return ((pred == target) & valid).sum(), valid.sum()


def standard_metrics(out: ModelOutput, labels: Optional[Tensor], items: int) -> dict[str, tuple[Number, Number]]:
    """The metrics of a model with a task loss: ``task_loss`` and ``acc`` per counted prediction
    (tokens for decoders, images for classifiers; ``acc`` only with logits), ``aux_loss`` per
    batch and ``heads_active`` per item (``items``: the batch size)."""
    metrics: dict[str, tuple[Number, Number]] = {}
    count = items
    if out.logits is not None and labels is not None:
        correct, count = accuracy_counts(out.logits.detach(), labels)
        metrics["acc"] = (correct, count)
    if out.task_loss is not None:
        metrics["task_loss"] = (out.task_loss.detach().float() * count, count)
    if out.aux_loss is not None:
        metrics["aux_loss"] = (out.aux_loss.detach().float(), 1)
    metrics["heads_active"] = (_active_fraction(out.routings, out.token_mask) * items, items)
    return metrics


def finish_output(out: ModelOutput, coef: float, labels: Optional[Tensor], items: int) -> ModelOutput:
    """Fill ``loss``, ``aux_loss`` and ``metrics`` of an output whose ``task_loss``, ``logits``,
    ``routings`` and ``token_mask`` are set: what every family's forward ends with."""
    out.loss, out.aux_loss = with_aux_loss(out.task_loss, out.routings, coef, out.token_mask)
    out.metrics = standard_metrics(out, labels, items)
    return out


def layer_heads(
    depth: int, num_heads: int, num_shared: int, top_k: Optional[int], schedule: Optional[Sequence[Sequence[int]]]
) -> list[tuple[int, int]]:
    """Per-layer (num_shared, top_k). ``schedule`` is None (same split everywhere) or ``depth``
    entries [num_shared, top_k] (the paper's ViT-B-75 changes the split per stage) or
    [num_heads, num_shared, top_k] (see ``layer_head_layout``)."""
    return [(s, k) for _, s, k in layer_head_layout(depth, num_heads, num_shared, top_k, schedule)]


def layer_head_layout(
    depth: int, num_heads: int, num_shared: int, top_k: Optional[int], schedule: Optional[Sequence[Sequence[int]]]
) -> list[tuple[int, int, int]]:
    """Per-layer (num_heads, num_shared, top_k). A ``schedule`` entry of two integers keeps
    ``num_heads``; one of three sets the layer's own head count (MoH-DiT-XL/2-90: 8, 16 and 24
    heads of width 72 in three layer groups)."""
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"depth={depth!r} must be a positive integer")
    if schedule is None:
        k = num_heads - num_shared if top_k is None else top_k
        return [(num_heads, num_shared, k)] * depth
    if len(schedule) != depth:
        raise ValueError(f"layer_heads has {len(schedule)} entries; the model has depth={depth}")
    out = []
    for i, entry in enumerate(schedule):
        if not isinstance(entry, (list, tuple)) or len(entry) not in (2, 3) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in entry):
            raise ValueError(f"layer_heads[{i}]={entry!r} must be [num_shared, top_k] or "
                             "[num_heads, num_shared, top_k] (integers)")
        out.append(tuple(int(v) for v in entry) if len(entry) == 3 else (num_heads, int(entry[0]), int(entry[1])))
    return out


__all__ = ["HeadSpec", "ModelOutput", "IGNORE_INDEX", "accuracy_counts", "standard_metrics", "finish_output",
           "with_aux_loss", "layer_heads", "layer_head_layout", "active_fraction"]
