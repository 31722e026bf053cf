"""What ``moh convert`` reads: a Hugging Face causal-LM directory, a GGUF file, or a hub id.

* a directory with ``config.json`` (and safetensors weights): ``AutoModelForCausalLM`` of a
  supported family (``moh.convert.families``), never ``trust_remote_code``;
* a ``.gguf`` file (or a directory holding exactly one, or ``gguf_file=`` inside a directory):
  transformers' GGUF reader dequantises it to float32 (needs the ``gguf`` package);
* a hub id (``org/name``): downloaded by transformers when online; with ``HF_HUB_OFFLINE`` set, or
  when the download fails, a ValueError that says so;
* a finished ``moh train`` run directory of a moh language model (LoRA adapters merged): stage 1
  of the paper's recipe (plain continued pretraining) converted for stage 2, or a tuned MoH model
  written out as a plain model directory (``router="keep"``).

The family is checked from the configuration before any weight is read.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from moh.convert.families import Family, family_of

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_TRUE = ("1", "true", "yes", "on")


@dataclass
class Source:
    model: Any  # a transformers PreTrainedModel (eval mode, float32 unless asked otherwise)
    tokenizer: Optional[Any]
    family: Family
    info: dict = field(default_factory=dict)  # kind, path, model_type, architecture, dtype, parameters


def _offline() -> list[str]:
    return [v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(v, "").lower() in _TRUE]


def resolve(src: str, gguf_file: Optional[str] = None) -> tuple[str, str, dict]:
    """(kind, where, load kwargs): kind "dir" | "gguf" | "hub"; ValueError naming ``src`` when it is
    none of them."""
    if not str(src).strip():
        raise ValueError(f"SRC {src!r} is empty; give a model directory, a .gguf file or a hub id")
    path = Path(src).expanduser()
    if gguf_file is not None:
        if not path.is_dir() or not (path / gguf_file).is_file():
            raise ValueError(f"--gguf-file {gguf_file!r}: no such file in directory {src!r}")
        return "gguf", str(path), {"gguf_file": gguf_file}
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"SRC {src!r} is a file but not a .gguf file; give a model directory, a .gguf file "
                             f"or a hub id")
        return "gguf", str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if (path / "config.yaml").is_file() and (path / "final.json").is_file():
            return "run", str(path), {}
        if (path / "config.json").is_file():
            return "dir", str(path), {}
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", str(path), {"gguf_file": ggufs[0]}
        what = f"several .gguf files {ggufs} (choose one with --gguf-file)" if ggufs else "no config.json and no .gguf file"
        raise ValueError(f"SRC directory {src!r} holds {what}")
    if _HUB_ID.match(src) and not src.startswith((".", "/", "~")):
        offline = _offline()
        if offline:
            raise ValueError(f"SRC {src!r} is not a local directory or .gguf file; as a Hugging Face hub id it needs "
                             f"the network, but {' and '.join(offline)} is set (download it where you are online, "
                             f"or pass a local directory / .gguf file)")
        return "hub", src, {}
    raise ValueError(f"SRC {src!r} does not exist (expected a model directory with config.json, a .gguf file, "
                     f"or a hub id like org/name)")


def load_config(kind: str, where: str, kwargs: dict):
    from transformers import AutoConfig

    import moh.hf  # noqa: F401  (registers model_type "moh")

    try:
        return AutoConfig.from_pretrained(where, **kwargs)
    except ImportError as e:  # GGUF without the gguf package
        raise ValueError(f"reading {where!r} {kwargs or ''} needs a missing package: {e}") from None
    except OSError as e:
        if kind == "hub":
            raise ValueError(f"could not download {where!r} from the Hugging Face hub ({e}); offline, pass a local "
                             f"model directory or .gguf file") from None
        raise ValueError(f"cannot read the configuration of {where!r}: {e}") from None


def load_source(src: str, *, gguf_file: Optional[str] = None, dtype: torch.dtype = torch.float32) -> Source:
    """The source model (eval mode, ``dtype``), its tokenizer (None when it has none) and family."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, where, kwargs = resolve(src, gguf_file)
    if kind == "run":
        return _load_run(where, dtype)
    config = load_config(kind, where, kwargs)
    family = family_of(config)  # refuses unsupported architectures before reading weights
    log.info("reading %s %s (%s, family %s)%s", kind, where, config.model_type, family.name,
             " (GGUF: dequantising)" if kind == "gguf" else "")
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except OSError as e:
        raise ValueError(f"cannot load the weights of {where!r}: {e}") from None
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, TypeError) as e:  # a model without a tokenizer (tests' tiny models)
        log.info("no tokenizer in %s (%s): the output directory gets none", where, type(e).__name__)
        tokenizer = None
    source_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    info = {"kind": kind, "path": str(Path(where).resolve()) if kind != "hub" else where, **kwargs,
            "model_type": config.model_type, "architecture": type(model).__name__, "family": family.name,
            "dtype": str(source_dtype).replace("torch.", "") if source_dtype is not None else None,
            "parameters": sum(p.numel() for p in model.parameters())}
    return Source(model, tokenizer, family, info)


def _load_run(where: str, dtype: torch.dtype) -> Source:
    """A finished ``moh train`` run of a moh language model (LoRA adapters merged)."""
    from transformers import AutoTokenizer

    from moh.convert.families import FAMILIES
    from moh.models.factory import HF_PREFIX
    from moh.train.engine import load_run
    from moh.train.finetune import merged

    model, cfg = load_run(where)
    model = merged(model).to(dtype).eval()
    if getattr(getattr(model, "config", None), "model_type", None) != "moh":
        raise ValueError(f"run {where!r} trained {cfg.model.name!r}, not a moh language model: nothing to convert")
    tokenizer = None
    # the run's own tokenizer (a language-model run saves it beside its weights), else its base model's
    for tok_dir in [where] + ([cfg.model.name[len(HF_PREFIX):]] if cfg.model.name.startswith(HF_PREFIX) else []):
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            break
        except (OSError, ValueError, TypeError):
            tokenizer = None
    info = {"kind": "run", "path": str(Path(where).resolve()), "model": cfg.model.name, "lora_merged": bool(cfg.model.lora),
            "model_type": "moh", "architecture": type(model).__name__, "family": "moh", "dtype": None,
            "parameters": sum(p.numel() for p in model.parameters())}
    return Source(model, tokenizer, FAMILIES["moh"], info)


__all__ = ["Source", "load_source", "resolve"]
