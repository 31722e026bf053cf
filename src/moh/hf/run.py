"""A training run directory that is also a transformers model directory.

The engine writes ``model.safetensors`` (and config.yaml, metrics, checkpoints); at the end of a run
it calls ``model.save_run_files(out_dir, train_data)``, which adds ``config.json`` and
``generation_config.json`` and, when the training data came from a tokenizer (the ``text`` data
set's token files record theirs), that tokenizer's files. Then::

    AutoModelForCausalLM.from_pretrained(run_dir)    # strict, safetensors
    AutoTokenizer.from_pretrained(run_dir)
    moh generate run_dir --prompt "..."
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

# what a tokenizer directory may hold (moh data tokenizer writes the first, second and last)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "moh_tokenizer.json")


def data_tokenizer_dir(data: Any) -> Optional[Path]:
    """The tokenizer directory a data set's tokens were made with (``PackedText.meta``), or None."""
    meta = getattr(data, "meta", None)
    if not isinstance(meta, dict) or not isinstance(meta.get("tokenizer"), dict):
        return None
    path = meta["tokenizer"].get("path")
    return Path(path) if path else None


def copy_tokenizer(src: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer files of ``src`` into ``out_dir`` (each through a temporary name and a
    rename); returns their names. ValueError when ``src`` holds no tokenizer."""
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if "tokenizer_config.json" not in names or not {"tokenizer.json", "vocab.json", "tokenizer.model"} & set(names):
        raise ValueError(f"{str(src)!r} holds no tokenizer (tokenizer.json + tokenizer_config.json)")
    for name in names:
        tmp = out_dir / f".{name}.tmp"
        shutil.copyfile(src / name, tmp)
        os.replace(tmp, out_dir / name)
    return names


def special_token_ids(tokenizer_dir: Path) -> dict[str, Optional[int]]:
    """bos / eos / pad token ids of a tokenizer directory."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def save_run_files(model: Any, out_dir: str | Path, data: Any = None) -> list[str]:
    """Add ``config.json``, ``generation_config.json`` and the data's tokenizer to ``out_dir``
    (which holds the engine's ``model.safetensors``); the special token ids of the tokenizer go
    into both configs, so ``generate()`` stops at its eos. Returns the names written."""
    out_dir = Path(out_dir)
    written = []
    tok_dir = data_tokenizer_dir(data)
    if tok_dir is not None:
        written += copy_tokenizer(tok_dir, out_dir)
        for key, value in special_token_ids(tok_dir).items():
            setattr(model.config, key, value)
            setattr(model.generation_config, key, value)
    else:
        log.info("%s: the training data names no tokenizer; the run directory has none", out_dir)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    return written + ["config.json", "generation_config.json"]


def read_model_config(model_dir: str | Path) -> dict:
    """``config.json`` of a moh model or run directory, checked: a missing directory or file, a
    run without it (trained before runs were exported, or not a language model) or another model
    type is a ValueError naming it."""
    import json

    d = Path(model_dir)
    if not d.is_dir():
        raise ValueError(f"{str(d)!r} is not a model or run directory: "
                         f"{'it is a file' if d.exists() else 'no such directory'}")
    path = d / "config.json"
    if not path.is_file():
        what = "a training run with no config.json (not a language model run?)" if (d / "config.yaml").is_file() \
            else "no config.json"
        raise ValueError(f"{str(d)!r} is not a transformers model directory: {what}")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON config ({e})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind != "moh":
        raise ValueError(f"{path}: model_type={kind!r}, not 'moh' (a moh language model); convert other models "
                         f"with moh.hf.from_llama")
    return config


def check_recorded_sha256(model_dir: Path) -> None:
    """When ``final.json`` (a training run's) records the weights' sha256, the file must have it."""
    import hashlib
    import json

    try:
        recorded = json.loads((model_dir / "final.json").read_text()).get("model_sha256")
    except (OSError, ValueError, AttributeError):
        return
    weights = model_dir / "model.safetensors"
    if recorded and weights.is_file():
        h = hashlib.sha256()
        with open(weights, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != recorded:
            raise ValueError(f"{weights}: content differs from what the run wrote (sha256 in final.json)")


def load_model_dir(model_dir: str | Path, *, tokenizer: bool = True, **kwargs: Any):
    """(model, tokenizer or None) of a moh model or run directory, every file checked before the
    model is built (``read_model_config``, the tokenizer files, the weights' sha256 a run
    recorded); loading is strict (``MoHForCausalLM.from_pretrained``, through the Auto class
    moh.hf registers: this module does not import the modeling one). ``kwargs`` go to it."""
    from transformers import AutoModelForCausalLM

    d = Path(model_dir)
    read_model_config(d)
    if tokenizer and not (d / "tokenizer_config.json").is_file():
        raise ValueError(f"{str(d)!r} has no tokenizer (tokenizer_config.json): runs trained on the text data set "
                         f"save theirs; for another model directory save one with tokenizer.save_pretrained")
    check_recorded_sha256(d)
    model = AutoModelForCausalLM.from_pretrained(str(d), **kwargs).eval()  # MoHForCausalLM's strict loading
    from moh.data.text.tokenizer import auto_tokenizer  # damaged tokenizer files: a ValueError naming d

    return model, (auto_tokenizer(d) if tokenizer else None)


__all__ = ["load_model_dir", "read_model_config", "check_recorded_sha256", "save_run_files", "copy_tokenizer", "data_tokenizer_dir", "special_token_ids", "TOKENIZER_FILES"]
