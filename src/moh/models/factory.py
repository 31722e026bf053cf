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


HF_PREFIX = "hf:"  # model name "hf:DIR": a saved moh model directory (moh convert OUT, save_pretrained)


def model_config(name: str, **overrides: Any):
    """The preset's config with ``overrides`` applied; unknown keys raise naming the key.
    ``hf:DIR``: the config of the moh model saved in DIR (``moh convert``'s output)."""
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string (a preset of moh.list_models() or hf:DIR), got {name!r}")
    if name.startswith(HF_PREFIX):
        from moh.hf.configuration import MoHLMConfig

        path = _hf_dir(name)
        return MoHLMConfig.from_pretrained(path).with_overrides(name, **overrides)
    preset = MODELS.get(name)()
    if hasattr(preset, "with_overrides"):  # a transformers config (moh.hf.MoHLMConfig) validates its own
        cfg = preset.with_overrides(name, **overrides)
    else:
        data = to_dict(preset)
        bad = sorted(set(overrides) - set(data))
        if bad:
            raise ValueError(f"unknown override(s) {bad} for model {name!r}; valid keys: {sorted(data)}")
        data.update(overrides)
        cfg = from_dict(type(preset), data)
    _check_head_fraction(name, preset, cfg, overrides)
    return cfg


# overrides that decide which heads a token uses; changing the head count without one of them
# would silently change a preset's fraction of active heads (2 shared + top-2 of 8 heads is 50%,
# of 4 heads 100%)
_HEAD_COUNT = {"num_heads", "num_attention_heads"}
_HEAD_SPLIT = {"num_shared", "num_shared_heads", "top_k", "top_k_heads", "layer_heads", "router"}


def _check_head_fraction(name: str, preset: Any, cfg: Any, overrides: dict) -> None:
    ignored = sorted({"num_shared", "top_k"} & set(overrides))
    if ignored and getattr(cfg, "layer_heads", None) is not None and "layer_heads" not in overrides:
        raise ValueError(f"{name!r} sets its heads per layer (layer_heads={cfg.layer_heads}), so overriding {ignored} "
                         f"would change nothing; override layer_heads instead (or set layer_heads=None)")
    if not _HEAD_COUNT & set(overrides) or _HEAD_SPLIT & set(overrides):
        return
    before, after = _active_fraction(preset), _active_fraction(cfg)
    if abs(before - after) > 1e-9:
        raise ValueError(
            f"overriding {sorted(_HEAD_COUNT & set(overrides))} changes {name!r} from {before:.0%} to {after:.0%} "
            f"of heads active; give num_shared / top_k (or layer_heads) too, or pick another preset")


def _active_fraction(cfg: Any) -> float:
    layers = cfg.attention_configs()
    return sum(a.active_heads for a in layers) / sum(a.num_heads for a in layers)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """The preset's model (random initialisation), or for ``hf:DIR`` the saved model's weights."""
    if isinstance(name, str) and name.startswith(HF_PREFIX):
        from moh.hf.modeling import MoHForCausalLM

        return MoHForCausalLM.from_pretrained(_hf_dir(name), config=model_config(name, **overrides))
    return model_config(name, **overrides).build()


def _hf_dir(name: str) -> str:
    from pathlib import Path

    path = Path(name[len(HF_PREFIX):]).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model {name!r}: {str(path)!r} is not a saved moh model directory (no config.json); "
                         f"make one with moh convert SRC OUT")
    return str(path)


def list_models() -> list[str]:
    return MODELS.names()


__all__ = ["MODELS", "model_config", "create_model", "list_models", "replace"]
