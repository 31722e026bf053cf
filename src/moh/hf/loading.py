"""Strict loading of moh's transformers models.

transformers' ``from_pretrained`` initialises missing tensors at random and drops unexpected ones
with a warning; for a moh model that is a silently different model, so here it is an error.
Weights are read from safetensors only (never a pickle); a damaged file is an error naming it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


def check_safetensors_files(directory: Path) -> None:
    """Open the header of every ``*.safetensors`` in ``directory``; a truncated, empty or foreign
    file is a ValueError naming it (safetensors checks the header against the file's size)."""
    from safetensors import safe_open

    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error type or OSError)
            raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def check_model_type(config_file: Path, model_type: str) -> None:
    """A ``config.json`` of another model type is a ValueError naming it (checked before any
    weights are read; transformers itself only warns)."""
    import json

    if not config_file.is_file():
        return  # transformers says what is missing
    try:
        kind = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{config_file}: not a readable JSON config ({e})") from None
    if kind != model_type:
        raise ValueError(f"{config_file}: model_type={kind!r}, not {model_type!r}: it is not a moh model "
                         f"(convert a LLaMA model with moh.hf.from_llama)")


def loading_problems(info: dict) -> list[str]:
    """What ``from_pretrained(..., output_loading_info=True)`` reported that is not a clean load."""
    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected")):
        names = sorted(info.get(key) or ())
        if names:
            problems.append(f"{what} tensors {names[:8]}" + (f" and {len(names) - 8} more" if len(names) > 8 else ""))
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        problems.append("tensors of the wrong shape " + ", ".join(f"{k} {tuple(a)} (model {tuple(b)})"
                                                                  for k, a, b in mismatched[:8]))
    problems += [str(m) for m in info.get("error_msgs") or ()]
    return problems


def strict_from_pretrained(load: Callable[..., Any], cls: type, path: Any, *args: Any, **kwargs: Any):
    """``load(path, ...)`` (a ``from_pretrained``) that raises a ValueError naming the problem
    when the weights do not fit the model exactly or a file is damaged; safetensors only."""
    want_info = kwargs.pop("output_loading_info", False)
    kwargs.setdefault("use_safetensors", True)
    kwargs["ignore_mismatched_sizes"] = True  # let transformers report them (in the info), then refuse them here
    local = Path(str(path))
    if not local.is_dir() and (local.exists() or str(path).startswith(("/", ".", "~"))):
        raise ValueError(f"cannot load a {cls.__name__} from {str(path)!r}: "
                         f"{'it is a file' if local.exists() else 'no such directory'} (give a model directory)")
    if local.is_dir():
        if (kwargs.get("config") is None and not kwargs.get("subfolder") and not kwargs.get("gguf_file")
                and not (local / "config.json").is_file()):
            raise ValueError(f"cannot load a {cls.__name__} from {str(path)!r}: no config.json (a moh model "
                             f"directory is written by save_pretrained, moh convert or moh train)")
        if kwargs.get("config") is None:
            check_model_type(local / "config.json", cls.config_class.model_type)
        check_safetensors_files(local)
    try:
        model, info = load(path, *args, output_loading_info=True, **kwargs)
    except OSError as e:  # no weights file, no config.json, ...
        raise ValueError(f"cannot load a {cls.__name__} from {str(path)!r}: {e}") from None
    except RuntimeError as e:
        if "loading state_dict" not in str(e):
            raise
        raise ValueError(f"{str(path)!r}: the weights do not fit {cls.__name__}: {e}") from None
    problems = loading_problems(info)
    if problems:
        raise ValueError(f"{str(path)!r}: the weights do not fit {cls.__name__} ({model.config.model_type}): "
                         + "; ".join(problems))
    return (model, info) if want_info else model


__all__ = ["strict_from_pretrained", "check_safetensors_files", "check_model_type", "loading_problems"]
