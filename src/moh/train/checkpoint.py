"""Training checkpoints: safetensors for tensors, JSON for scalars, written atomically.

Layout of one checkpoint (``<out_dir>/checkpoints/step_00000120/``):
    model.safetensors       the unwrapped model's weights (shared tensors stored once)
    optimizer.safetensors   per-parameter optimizer tensors, keys "<param index>.<name>"
    state.json              step, data position, optimizer param groups and scalar state, ...
    rng_<rank>.safetensors  torch (and CUDA) generator states of each process
    rng_<rank>.json         python and numpy generator states of each process

A checkpoint is built in a hidden temporary directory, every file is fsynced, and the directory
is renamed into place: a crash leaves either the whole checkpoint or none of it visible.
Nothing is unpickled; loading reads only safetensors and JSON.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")


# ---------------------------------------------------------------------------------------------
# atomic files and directories


def fsync_path(path: Path) -> None:
    """Flush a file or directory entry to disk (directories: so a rename survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def save_weights(model: nn.Module, path: Path) -> None:
    """The model's weights to ``path`` (safetensors), atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_model(model, str(tmp))
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def load_weights(model: nn.Module, path: Path) -> None:
    missing, unexpected = load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the model: missing {missing}, unexpected {unexpected}")


# ---------------------------------------------------------------------------------------------
# optimizer state <-> (tensors, JSON)


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into safetensors-able tensors and JSON-able scalars."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, pstate in sd["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------------------------
# random generators of one process


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """torch / CUDA / numpy / python generator states as (tensors, JSON)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, list(internal), gauss_next]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ---------------------------------------------------------------------------------------------
# checkpoints


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary directories are ignored)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def remove_dir(path: Path) -> None:
    """Delete a directory so that no half-deleted checkpoint stays visible: rename, then delete."""
    trash = path.with_name(f".del-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash)


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints (0 or less keeps all)."""
    if keep_last <= 0:
        return
    for path in list_checkpoints(root)[:-keep_last]:
        remove_dir(path)


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
    keep_last: int = 0,
) -> Path:
    """Write checkpoint ``step`` under ``root``; every process calls this (rank 0 writes the model,
    optimizer and ``state``; each rank its generator states). Returns the checkpoint directory."""
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash
        tmp.mkdir()
    barrier()
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, str(tmp / f"rng_{rank}.safetensors"))
    write_json(tmp / f"rng_{rank}.json", rng_meta)
    if rank == 0:
        save_model(model, str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "state.json", dict(state, step=step, optimizer=opt_meta))
    barrier()
    if rank == 0:
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        if final.exists():  # the same step saved again (e.g. a resumed run's last step)
            remove_dir(final)
        os.rename(tmp, final)
        fsync_path(root)
        prune_checkpoints(root, keep_last)
        log.info("saved checkpoint %s", final)
    barrier()
    return final


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0) -> dict:
    """Restore model, optimizer and this process's generators from ``path``; returns state.json."""
    state = json.loads((path / "state.json").read_text())
    load_weights(model, path / "model.safetensors")
    optimizer_from_flat(optimizer, load_file(str(path / "optimizer.safetensors")), state.pop("optimizer"))
    rng_file = path / f"rng_{rank}.safetensors"
    if rng_file.is_file():
        set_rng_state(load_file(str(rng_file)), json.loads((path / f"rng_{rank}.json").read_text()))
    else:  # more processes than when saved: this one keeps its fresh seed
        log.warning("%s has no generator state for rank %d; the resumed run is not bit-exact", path, rank)
    return state
