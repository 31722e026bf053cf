"""Typed configs. ``MoHConfig`` describes one MoH attention layer and validates itself.

Also generic helpers to turn (nested) dataclass configs into plain dicts / YAML and back,
rejecting unknown keys by name, and to apply ``a.b.c=value`` command-line overrides.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Type, TypeVar

import yaml

C = TypeVar("C")


class Derived(int):
    """An integer a config derived from its other fields (``head_dim = dim // num_heads``, ...).
    ``dataclasses.replace`` passes it back in; ``__post_init__`` sees the marker and derives it
    again from the new fields, so ``replace(cfg, dim=128)`` never keeps a stale value. It
    serialises as None (derived again on load)."""

    def __repr__(self) -> str:
        return f"{int(self)}"


def _given(value: Any) -> Any:
    return None if isinstance(value, Derived) else value


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")


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
    router: str = "two_stage"  # name in moh.ROUTERS
    backend: str = "sparse"  # name in moh.BACKENDS
    causal: bool = False
    rope: bool = False
    rope_theta: float = 10000.0
    qk_norm: bool = False
    dropout: float = 0.0  # dropout on attention probabilities
    qkv_bias: bool = False
    out_bias: bool = False

    def __post_init__(self) -> None:
        _check_int("dim", self.dim, 1)
        _check_int("num_heads", self.num_heads, 1)
        self.num_kv_heads, self.head_dim, self.top_k = map(_given, (self.num_kv_heads, self.head_dim, self.top_k))
        if self.num_kv_heads is None:
            self.num_kv_heads = Derived(self.num_heads)
        if self.head_dim is None:
            if self.dim % self.num_heads:
                raise ValueError(
                    f"dim={self.dim} is not divisible by num_heads={self.num_heads}; set head_dim explicitly"
                )
            self.head_dim = Derived(self.dim // self.num_heads)
        _check_int("num_shared", self.num_shared, 0)
        if self.top_k is None and 0 <= self.num_shared <= self.num_heads:
            self.top_k = Derived(self.num_heads - self.num_shared)
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
        from moh.registry import BACKENDS, ROUTERS

        for name in ("dim", "num_heads", "num_kv_heads", "head_dim"):
            _check_int(name, getattr(self, name), 1)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}"
            )
        if not 0 <= self.num_shared <= self.num_heads:
            raise ValueError(f"num_shared={self.num_shared} must be in [0, num_heads={self.num_heads}]")
        _check_int("top_k", self.top_k, 0)
        if self.router != "all":
            if not 0 <= self.top_k <= self.num_routed:
                raise ValueError(
                    f"top_k={self.top_k} must be in [0, num_heads - num_shared = {self.num_routed}]"
                )
            if self.num_shared + self.top_k == 0:
                raise ValueError("num_shared=0 and top_k=0: every token would use no head")
        for name in ("causal", "rope", "qk_norm", "qkv_bias", "out_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.rope and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got head_dim={self.head_dim}")
        if not isinstance(self.rope_theta, (int, float)) or isinstance(self.rope_theta, bool) or not (
                0 < self.rope_theta < float("inf")):
            raise ValueError(f"rope_theta={self.rope_theta!r} must be a finite number > 0")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        for name, registry in (("router", ROUTERS), ("backend", BACKENDS)):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"{name}={value!r} must be a name; valid choices: {registry.names()}")
            registry.get(value)  # raises naming the valid names


# --------------------------------------------------------------------------------------------
# dataclass <-> dict / YAML, with strict keys


def to_dict(cfg: Any) -> Any:
    if isinstance(cfg, Derived):
        return None
    if is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _coerce(value: Any, tp: Any, where: str, *, optional: bool = False) -> Any:
    """Scalars from YAML / the command line to the field's type (YAML reads 3e-4 as a string).
    ``None`` is accepted only for ``optional`` fields; lists and dicts only for list / dict fields.
    ints accept whole floats (3.0) but not 2.5, inf or nan."""
    if value is None:
        if optional or tp is Any:
            return None
        raise ValueError(f"config key {where!r} needs a value ({_type_name(tp)}), got null / an empty value")
    origin = typing.get_origin(tp) or tp
    if origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            return list(value) if origin is list else tuple(value)
        raise ValueError(f"config key {where!r} must be a list, got {value!r}")
    if origin is dict:
        if isinstance(value, dict):
            return value
        raise ValueError(f"config key {where!r} must be a mapping, got {value!r}")
    if tp not in (int, float, bool, str):
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
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except ValueError:
            f = math.nan
        if math.isfinite(f) and f == int(f):
            return int(f)
    elif tp is str and isinstance(value, str):
        return value
    raise ValueError(f"config key {where!r} must be {_type_name(tp)}, got {value!r}")


def coerce_value(value: Any, annotation: Any, where: str) -> Any:
    """``value`` converted to a field annotated ``annotation`` (``Optional[int]``, ``float``, ...);
    a ValueError naming ``where`` if it does not fit."""
    return _coerce(value, _unwrap_optional(annotation), where, optional=_is_optional(annotation))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def from_dict(cls: Type[C], data: Any, *, where: str = "") -> C:
    """Build dataclass ``cls`` from a dict; unknown keys raise a ``ValueError`` naming them, and so
    do values of the wrong type (a section given as a list or scalar, null for a number, ...)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config section {where or cls.__name__!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(
            f"unknown config key(s) {[prefix + str(k) for k in unknown]}; valid keys: {sorted(known)}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = _unwrap_optional(hints[name])
        sub = f"{where}.{name}" if where else name
        if is_dataclass(tp) and not (value is None and _is_optional(hints[name])):
            value = from_dict(tp, value, where=sub)
        else:
            value = coerce_value(value, hints[name], sub)
        kwargs[name] = value
    return cls(**kwargs)


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML through a new temporary file and a rename (never a half-written file,
    never through a symbolic link planted at the temporary name)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys in a mapping (plain YAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, f"unhashable key {key!r}", key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> Any:
    """``text`` parsed with the strict safe loader; a syntax error or duplicate key is a ValueError
    naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise ValueError(f"{source}{at}: invalid YAML: {what}") from None


def load_yaml(path: str | Path) -> dict:
    """The mapping in YAML file ``path``. A missing, unreadable, empty or malformed file, a
    duplicate key, or a top level that is not a mapping is a ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        what = ("does not exist" if not path.exists() else "is a directory, not a file" if path.is_dir()
                else "is not a regular file")
        raise ValueError(f"config file {str(path)!r} {what}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {str(path)!r} cannot be read: {e}") from None
    data = parse_yaml(text, f"config file {str(path)!r}")
    if data is None:
        raise ValueError(f"config file {str(path)!r} is empty (it must hold a mapping: model:, data:, ...)")
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict, in place.
    A malformed key or value is a ValueError naming the override."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {item!r}: {key.strip()!r} is not a key path like train.seed")
        node = data
        for i, p in enumerate(parts[:-1]):
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parts[: i + 1])!r} is not a config section")
        node[parts[-1]] = parse_yaml(raw, f"override {item!r}")
    return data


def replace(cfg: C, **changes: Any) -> C:
    return dataclasses.replace(cfg, **changes)


__all__ = ["MoHConfig", "Derived", "to_dict", "from_dict", "save_yaml", "load_yaml", "apply_overrides", "parse_yaml", "coerce_value", "replace", "field"]
