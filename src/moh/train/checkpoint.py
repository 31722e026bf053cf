"""Training checkpoints: safetensors for tensors, JSON for scalars, written atomically.

Layout of one checkpoint (``<out_dir>/checkpoints/step_00000120/``):
    model.safetensors       the full model's weights (tied tensors stored once), as
                            ``safetensors.torch.save_model`` writes them for a plain module
    optimizer.safetensors   per-parameter optimizer tensors, keys "<param index>.<name>"
    state.json              step, data position, optimizer param groups and scalar state, ...
    rng_<rank>.safetensors  torch (and CUDA) generator states of each process
    rng_<rank>.json         python and numpy generator states of each process
    manifest.json           size and sha256 of every other file (written last)

A checkpoint is built in a hidden temporary directory, every file is fsynced, and the directory
is renamed into place: a crash leaves either the whole checkpoint or none of it visible.
Nothing is unpickled; loading reads only safetensors and JSON.

Loading checks before it changes anything: the manifest (sizes and hashes: a truncated,
overwritten or bit-flipped file is found), that every file parses, that the weights fit the model
exactly (names, shapes, dtypes: ``moh.train.distributed.check_model_state``) and the optimizer
state fits the optimizer, and that no tensor holds NaN or infinity. A failure is a
``CheckpointError`` (a ValueError) naming the file; resume then falls back to an older checkpoint.

Models and optimizers may be plain, DDP-unwrapped or FSDP2-sharded: state goes through
``moh.train.distributed.gather_full_state`` / ``load_full_state``, so the files are the same in
every case. Under torch.distributed, saving and loading are collectives (every process calls them;
rank 0 writes).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from moh.train.distributed import check_finite, gather_full_state, load_full_state, tied_groups

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
_LEFTOVER = re.compile(r"^\.(del|tmp)-step_\d+$")  # a kill during a prune / a save
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used (missing, damaged, or not fitting the
    model); the message names the file."""


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
    """Write ``text`` to ``path`` through a new temporary file (created exclusively: a planted
    symlink is never followed) and a rename. A ``path`` that is a symlink or a directory is
    refused: the rename would replace the link, or fail after the work is done."""
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"{str(path)!r} is a symbolic link; refusing to write through it")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory; a file path is needed")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a missing, empty, truncated or foreign file is a
    CheckpointError naming it (the library's own errors do not)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {'is a directory, not a file' if path.is_dir() else 'missing'}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def read_json(path: Path) -> Any:
    """The JSON in ``path``; missing, unreadable or malformed is a CheckpointError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None


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
    """The full state dict in ``path`` with the tied names ``write_model_file`` dropped put back
    (from the file's metadata, and for ``model``'s own tied groups). A damaged file, or tied names
    stored with different values, is a CheckpointError naming the file."""
    sd, metadata = read_safetensors(path)
    for dropped, kept in metadata.items():
        if kept in sd and dropped not in sd:
            sd[dropped] = sd[kept]
    for group in tied_groups(model):
        present = [name for name in group if name in sd]
        for name in present[1:]:
            a, b = sd[present[0]], sd[name]
            if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
                raise CheckpointError(f"{path}: {present[0]} and {name} are one tensor in the model (tied) "
                                      f"but differ in the file")
        for name in group:
            if present and name not in sd:
                sd[name] = sd[present[0]]
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
    collective under torch.distributed. A damaged file, a tensor missing, unexpected, of another
    shape or of a dtype that does not cast safely, or NaN / infinite weights: a CheckpointError
    (ValueError) naming the file and the tensors, and the model is left as it was."""
    sd = read_model_file(model, path)
    try:
        check_finite(sd)
        load_full_state(model, sd)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


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


def remove_leftovers(root: Path) -> list[str]:
    """Delete the hidden ``.tmp-step_*`` / ``.del-step_*`` directories a kill during a save or a
    prune leaves under ``root``; returns their names."""
    if not root.is_dir():
        return []
    gone = []
    for p in sorted(root.iterdir()):
        if _LEFTOVER.match(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
            gone.append(p.name)
    return gone


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``.damaged-step_*`` (kept for inspection, never loaded or
    pruned) and return the new path."""
    dest = path.with_name(f".damaged-{path.name}")
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(path, dest)
    return dest


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
        write_json(tmp / MANIFEST, {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                                    for f in sorted(tmp.iterdir())})
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


def verify_manifest(path: Path) -> None:
    """CheckpointError unless every file ``manifest.json`` lists is there with its size and
    sha256. A checkpoint written before manifests existed passes (its files are still parsed and
    checked when read)."""
    manifest_file = path / MANIFEST
    if not manifest_file.exists():
        return
    manifest = read_json(manifest_file)
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_file}: not a manifest")
    for name, entry in sorted(manifest.items()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {MANIFEST})")
        size = f.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointError(f"{f}: {size} bytes, {entry.get('bytes')} when written (truncated or overwritten)")
        if sha256_file(f) != entry.get("sha256"):
            raise CheckpointError(f"{f}: content differs from when it was written (sha256 mismatch)")


def read_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0) -> dict:
    """Read and check every file of checkpoint ``path`` for this process without changing
    anything: the manifest, the JSON and safetensors files, that the weights and optimizer state fit
    ``model`` / ``optimizer`` and hold no NaN or infinity. Returns what ``apply_checkpoint`` needs;
    any problem is a CheckpointError naming the file. No collective."""
    from moh.train.distributed import check_model_state, check_optimizer_state

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    verify_manifest(path)
    state = read_json(path / "state.json")
    if not isinstance(state, dict) or not {"step", "optimizer", "micro_batches"} <= set(state):
        raise CheckpointError(f"{path / 'state.json'}: lacks step / micro_batches / optimizer")
    opt_tensors, _ = read_safetensors(path / "optimizer.safetensors")
    try:
        optim_sd = optimizer_from_flat(opt_tensors, state.pop("optimizer"))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path / 'state.json'}: optimizer entry does not match optimizer.safetensors ({e!r})") from None
    model_sd = read_model_file(model, path / "model.safetensors")
    for what, check in (("model.safetensors", lambda: (check_model_state(model, model_sd), check_finite(model_sd))),
                        ("optimizer.safetensors", lambda: (check_optimizer_state(model, optimizer, optim_sd),
                                                           check_finite(opt_tensors, "optimizer tensors")))):
        try:
            check()
        except ValueError as e:
            raise CheckpointError(f"{path / what}: {e}") from None
    rng = None
    rng_file = path / f"rng_{rank}.safetensors"
    if rng_file.exists() or (path / f"rng_{rank}.json").exists():
        rng_tensors, _ = read_safetensors(rng_file)
        rng_meta = read_json(path / f"rng_{rank}.json")
        if "torch" not in rng_tensors or not isinstance(rng_meta, dict) or not {"numpy", "python"} <= set(rng_meta):
            raise CheckpointError(f"{rng_file}: not a generator state")
        rng = (rng_tensors, rng_meta)
    return {"path": path, "state": state, "model_sd": model_sd, "optim_sd": optim_sd, "rng": rng, "rank": rank}


def apply_checkpoint(loaded: dict, *, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Put what ``read_checkpoint`` read into model, optimizer and this process's generators;
    returns state.json. Collective under torch.distributed (each process keeps its shard)."""
    path = loaded["path"]
    try:
        load_full_state(model, loaded["model_sd"], optimizer, loaded["optim_sd"])
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if loaded["rng"] is not None:
        set_rng_state(*loaded["rng"])
    else:  # more processes than when saved: this one keeps its fresh seed
        log.warning("%s has no generator state for rank %d; the resumed run is not bit-exact", path, loaded["rank"])
    return loaded["state"]


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0) -> dict:
    """Check, then restore model, optimizer and this process's generators from ``path``; returns
    state.json. Collective under torch.distributed (every process reads the files and keeps its
    shard). A damaged or unfitting checkpoint is a CheckpointError and changes nothing."""
    return apply_checkpoint(read_checkpoint(path, model=model, optimizer=optimizer, rank=rank),
                            model=model, optimizer=optimizer)
