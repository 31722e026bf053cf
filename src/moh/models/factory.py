"""Named presets: one-line constructors in a name -> (config class, kwargs) table."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from torch import nn

from moh.config import from_dict, to_dict
from moh.registry import Registry

# name -> zero-argument function returning a config (a dataclass, or a transformers config with
# with_overrides) whose .build() makes the model
MODELS: Registry[Callable[[], Any]] = Registry("model")


def model_config(name: str, **overrides: Any):
    """The preset's config with ``overrides`` applied; unknown keys raise naming the key."""
    cfg = MODELS.get(name)()
    if hasattr(cfg, "with_overrides"):  # a transformers config (moh.hf.MoHLMConfig) validates its own
        return cfg.with_overrides(name, **overrides)
    data = to_dict(cfg)
    bad = sorted(set(overrides) - set(data))
    if bad:
        raise ValueError(f"unknown override(s) {bad} for model {name!r}; valid keys: {sorted(data)}")
    data.update(overrides)
    return from_dict(type(cfg), data)


def create_model(name: str, **overrides: Any) -> nn.Module:
    return model_config(name, **overrides).build()


def list_models() -> list[str]:
    return MODELS.names()


__all__ = ["MODELS", "model_config", "create_model", "list_models", "replace"]
