"""Typed configs. ``MoHConfig`` describes one MoH attention layer and validates itself.

Also generic helpers to turn (nested) dataclass configs into plain dicts / YAML and back,
rejecting unknown keys by name, and to apply ``a.b.c=value`` command-line overrides.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Type, TypeVar

import yaml

C = TypeVar("C")


@dataclass
class MoHConfig:
    """One Mixture-of-Head attention layer (arXiv 2410.11842, Sec. 3).

    Heads ``0 .. num_shared-1`` are shared (every token uses them); the other
    ``num_routed = num_heads - num_shared`` heads are routed, and each token keeps ``top_k`` of them.
    ``router="all"`` ignores the split and uses every head with gate 1 (plain multi-head attention).
    """

    dim: int
    num_heads: int
    num_kv_heads: Optional[int] = None  # None: = num_heads (no grouped-query attention)
    head_dim: Optional[int] = None  # None: dim // num_heads
    num_shared: int = 0
    top_k: Optional[int] = None  # None: every routed head (no sparsity)
    router: str = "two_stage"  # name in moh.core.routers.ROUTERS
    backend: str = "sparse"  # name in moh.backends.BACKENDS
    causal: bool = False
    rope: bool = False
    rope_theta: float = 10000.0
    qk_norm: bool = False
    dropout: float = 0.0  # dropout on attention probabilities
    qkv_bias: bool = False
    out_bias: bool = False

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.num_heads > 0 and self.dim % self.num_heads:
                raise ValueError(
                    f"dim={self.dim} is not divisible by num_heads={self.num_heads}; set head_dim explicitly"
                )
            self.head_dim = self.dim // max(self.num_heads, 1)
        if self.top_k is None:
            self.top_k = self.num_heads - self.num_shared
        self.validate()

    # derived -----------------------------------------------------------------------------
    @property
    def num_routed(self) -> int:
        return self.num_heads - self.num_shared

    @property
    def active_heads(self) -> int:
        """Heads each token uses."""
        return self.num_heads if self.router == "all" else self.num_shared + self.top_k

    @property
    def active_fraction(self) -> float:
        return self.active_heads / self.num_heads

    def validate(self) -> None:
        from moh.backends import BACKENDS
        from moh.core.routers import ROUTERS

        for name in ("dim", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}"
            )
        if not 0 <= self.num_shared <= self.num_heads:
            raise ValueError(f"num_shared={self.num_shared} must be in [0, num_heads={self.num_heads}]")
        if self.router != "all":
            if not 0 <= self.top_k <= self.num_routed:
                raise ValueError(
                    f"top_k={self.top_k} must be in [0, num_heads - num_shared = {self.num_routed}]"
                )
            if self.num_shared + self.top_k == 0:
                raise ValueError("num_shared=0 and top_k=0: every token would use no head")
        if self.rope and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got head_dim={self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        ROUTERS.get(self.router)  # raises naming the valid routers
        BACKENDS.get(self.backend)


# --------------------------------------------------------------------------------------------
# dataclass <-> dict / YAML, with strict keys


def to_dict(cfg: Any) -> Any:
    if is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Scalars from YAML / the command line to the field's type (YAML reads 3e-4 as a string)."""
    if value is None or tp not in (int, float, bool, str):
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif tp is int and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            f = float(value)
            if f == int(f):
                return int(f)
        except ValueError:
            pass
    elif tp is str and isinstance(value, str):
        return value
    raise ValueError(f"config key {where!r} must be {tp.__name__}, got {value!r}")


def from_dict(cls: Type[C], data: Any, *, where: str = "") -> C:
    """Build dataclass ``cls`` from a dict; unknown keys raise a ``ValueError`` naming them."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config section {where or cls.__name__!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys: {sorted(known)}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = _unwrap_optional(hints[name])
        sub = f"{where}.{name}" if where else name
        if is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value, where=sub)
        else:
            value = _coerce(value, tp, sub)
        kwargs[name] = value
    return cls(**kwargs)


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a config section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def replace(cfg: C, **changes: Any) -> C:
    return dataclasses.replace(cfg, **changes)


__all__ = ["MoHConfig", "to_dict", "from_dict", "save_yaml", "load_yaml", "apply_overrides", "replace", "field"]
