"""Exponential moving average of a model's parameters, kept in buffers of a submodule.

Because the average lives in buffers, everything that saves the model's ``state_dict`` carries it:
the engine's checkpoints (so ``--resume`` continues the average exactly) and ``model.safetensors``
(so sampling reads it). Buffer names are the parameter names with "." replaced by "__"
(``ema.blocks__0__attn__q_proj__weight``); ``ema.num_updates`` counts the updates.

    ema <- decay * ema + (1 - decay) * param,   decay = min(decay_max, (1 + n) / (10 + n))

with the warm-up term when ``warmup`` is set (n updates so far), so a short run's average is not
dominated by its random initialisation; DiT uses decay_max 0.9999 without warm-up over 400K steps.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn


def _key(name: str) -> str:
    return name.replace(".", "__")


def _full(p: Tensor) -> Tensor:
    """The whole tensor of a parameter (an FSDP2 shard is gathered: a collective)."""
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p


class EMA(nn.Module):
    """EMA of the named parameters given at construction (their current values start it)."""

    def __init__(self, named_params: Iterable[tuple[str, Tensor]], decay: float = 0.9999, warmup: bool = False):
        super().__init__()
        if not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay={decay!r} must be in [0, 1]")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.names: list[str] = []
        for name, p in named_params:
            self.register_buffer(_key(name), p.detach().clone().float())
            self.names.append(name)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def decay_at(self, n: int) -> float:
        """The decay of update number ``n`` (0-based)."""
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def shadow(self, name: str) -> Tensor:
        return getattr(self, _key(name))

    @torch.no_grad()
    def update(self, named_params: Iterable[tuple[str, Tensor]]) -> None:
        """One step of the average towards the given parameters (the names given at construction)."""
        decay = self.decay_at(int(self.num_updates))
        seen = 0
        for name, p in named_params:
            self.shadow(name).lerp_(_full(p.detach()).float(), 1.0 - decay)
            seen += 1
        if seen != len(self.names):
            raise ValueError(f"EMA tracks {len(self.names)} parameters, update got {seen}")
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, named_params: Iterable[tuple[str, Tensor]]) -> None:
        """Overwrite the parameters with the average (in place)."""
        for name, p in named_params:
            p.copy_(self.shadow(name).to(p.dtype))

    @contextlib.contextmanager
    def applied(self, named_params: Iterable[tuple[str, Tensor]]) -> Iterator[None]:
        """Temporarily use the averaged weights; the trained ones come back on exit."""
        params = list(named_params)
        saved = [p.detach().clone() for _, p in params]
        self.copy_to(params)
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), s in zip(params, saved):
                    p.copy_(s)


__all__ = ["EMA"]
