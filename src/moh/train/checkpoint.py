"""Training checkpoints: safetensors for tensors, JSON for scalars, written atomically.

Layout of one checkpoint (``<out_dir>/checkpoints/step_00000120/``):
    model.safetensors       the full model's weights (tied tensors stored once), as
                            ``safetensors.torch.save_model`` writes them for a plain module
    optimizer.safetensors   per-parameter optimizer tensors, keys "<param index>.<name>"
    state.json              step, data position, optimizer param groups and scalar state, ...
    rng_<rank>.safetensors  torch (and CUDA) generator states of each process
    rng_<rank>.json         python and numpy generator states of each process

A checkpoint is built in a hidden temporary directory, every file is fsynced, and the directory
is renamed into place: a crash leaves either the whole checkpoint or none of it visible.
Nothing is unpickled; loading reads only safetensors and JSON.

Models and optimizers may be plain, DDP-unwrapped or FSDP2-sharded: state goes through
``moh.train.distributed.gather_full_state`` / ``load_full_state``, so the files are the same in
every case. Under torch.distributed, saving and loading are collectives (every process calls them;
rank 0 writes).
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
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from moh.train.distributed import gather_full_state, load_full_state, tied_groups

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


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def write_model_file(model_sd: dict[str, torch.Tensor], tied: list[list[str]], path: Path) -> None:
    """Write a full model state dict to ``path`` the way ``safetensors.torch.save_model`` writes a
    plain module: of each group of ``tied`` names the first is stored, the others are dropped and
    named in the metadata ({dropped: kept}); tensors contiguous."""
    sd, metadata = dict(model_sd), {}
    for group in tied:
        present = [name for name in group if name in sd]
        for name in present[1:]:
            metadata[name] = present[0]
            del sd[name]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata or None)


def read_model_file(model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """The full state dict in ``path`` with the tied names ``write_model_file`` dropped put back."""
    sd = load_file(str(path))
    for group in tied_groups(model):
        kept = next((name for name in group if name in sd), None)
        for name in group:
            if kept is not None and name not in sd:
                sd[name] = sd[kept]
    return sd


def save_weights(model: nn.Module, path: Path) -> None:
    """The model's full weights to ``path`` (safetensors), atomically. Collective under
    torch.distributed (an FSDP model is gathered); rank 0 writes."""
    model_sd, _ = gather_full_state(model)
    if _rank() != 0:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    write_model_file(model_sd, tied_groups(model), tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load ``path`` (as ``save_weights`` writes it) into a plain, DDP-unwrapped or FSDP model;
    collective under torch.distributed. Raises ValueError if the names do not fit."""
    try:
        load_full_state(model, read_model_file(model, path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# optimizer state <-> (tensors, JSON)


def optimizer_to_flat(optim_sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an ``optimizer.state_dict()``-shaped dict into safetensors-able tensors and
    JSON-able scalars."""
    tensors, scalars = {}, {}
    for idx, pstate in optim_sd["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": optim_sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The ``optimizer.state_dict()``-shaped dict that ``optimizer_to_flat`` split."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


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
    """Write checkpoint ``step`` under ``root``; every process calls this (all take part in
    gathering a sharded model and optimizer; rank 0 writes them and ``state``; each rank its
    generator states). Returns the checkpoint directory."""
    model_sd, optim_sd = gather_full_state(model, optimizer)
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
        write_model_file(model_sd, tied_groups(model), tmp / "model.safetensors")
        opt_tensors, opt_meta = optimizer_to_flat(optim_sd)
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
    """Restore model, optimizer and this process's generators from ``path``; returns state.json.
    Collective under torch.distributed (every process reads the files and keeps its shard)."""
    state = json.loads((path / "state.json").read_text())
    optim_sd = optimizer_from_flat(load_file(str(path / "optimizer.safetensors")), state.pop("optimizer"))
    try:
        load_full_state(model, read_model_file(model, path / "model.safetensors"), optimizer, optim_sd)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    rng_file = path / f"rng_{rank}.safetensors"
    if rng_file.is_file():
        set_rng_state(load_file(str(rng_file)), json.loads((path / f"rng_{rank}.json").read_text()))
    else:  # more processes than when saved: this one keeps its fresh seed
        log.warning("%s has no generator state for rank %d; the resumed run is not bit-exact", path, rank)
    return state
