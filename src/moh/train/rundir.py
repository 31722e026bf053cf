"""The run directory (``train.out_dir``) as something one run owns.

What ``fit`` guarantees, and where it is done:

* **No run is replaced by accident.** A directory that holds a run (any of ``RUN_FILES``) is
  refused for a new run unless ``train.resume`` (continue it) or ``train.overwrite`` (replace it).
  With ``overwrite`` the old run's files are *moved* to ``<out_dir>/.overwritten/`` once the new
  run has started (data and model built, config checked, the lock taken), and deleted when the new
  run has finished; if the new run fails they stay there (move them back by hand). Files that are
  not a run's (a README you keep there, ...) are never touched.
* **Nothing is written before the run starts**: ``preflight`` only reads (the path, the saved
  config, write permission of the directory or of its nearest existing parent), so a bad config,
  a missing data set or an unwritable path fails before the directory is created.
* **One run per directory**: ``RunLock`` holds an exclusive ``fcntl.flock`` on ``<out_dir>/.lock``
  while the run is in progress; a second run gets an error naming the directory and the holder's
  pid. The lock goes with the process (a killed run leaves no stale lock).
* **Resume follows the saved run**: ``<out_dir>/config.yaml`` is the run's config. A resume whose
  config differs from it in anything but ``RESUME_MAY_CHANGE`` is refused, naming each key with
  both values. config.yaml is written once, when a run starts; a resume rewrites it only to record
  a new ``train.steps``; every resume appends what it changed to ``resumes.jsonl``.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from moh.config import to_dict
from moh.train.config import RunConfig

log = logging.getLogger(__name__)

# What a run writes into its directory (moh.train.engine); their presence means "a run is here".
RUN_FILES = ("config.yaml", "model.safetensors", "final.json", "checkpoints", "metrics.jsonl", "metrics.csv",
             "eval.jsonl", "eval.csv", "tb", "resumes.jsonl")
LOCK, OVERWRITTEN = ".lock", ".overwritten"

# Keys a resume may change: they do not change what is computed (train.steps changes the length
# and the cosine schedule's end; it is recorded in config.yaml and resumes.jsonl). Every other key
# (seed, batch size, accumulation, model, data, optimizer, fsdp, eval_batches, ...) must equal the
# saved run's.
RESUME_MAY_CHANGE = ("train.steps", "train.log_every", "train.progress", "train.num_workers", "train.eval_every",
                     "train.save_every", "train.keep_last", "train.metrics_csv", "train.tensorboard")
_BOOKKEEPING = ("train.resume", "train.overwrite", "train.out_dir")  # describe the command, not the run


# ---------------------------------------------------------------------------------------------
# paths


def check_writable_dir(path: str | Path, what: str = "output directory") -> Path:
    """ValueError unless ``path`` is, or can be created as, a directory this process can write:
    a file in the way, a parent that is a file, or a read-only / unwritable nearest existing
    directory is named. Nothing is created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} exists and is not a directory")
    probe = path
    while not probe.exists():
        if probe.is_symlink():  # a dangling link
            raise ValueError(f"{what} {str(path)!r}: {str(probe)!r} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what} {str(path)!r}: {str(probe)!r} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(path)!r}: {str(probe)!r} is not writable")
    return path


def check_writable_file(path: str | Path, what: str = "output file") -> Path:
    """ValueError unless ``path`` can be written as a regular file: not a directory, not a
    symbolic link, its directory writable (or creatable). Nothing is created."""
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"{what} {str(path)!r} is a symbolic link; refusing to write through it")
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory; give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {str(path)!r} is not writable")
    try:
        check_writable_dir(path.parent, "its directory")
    except ValueError as e:
        raise ValueError(f"{what} {str(path)!r}: {e}") from None
    return path


def run_files(out_dir: Path) -> list[str]:
    """The names of ``RUN_FILES`` present in ``out_dir``."""
    return [name for name in RUN_FILES if (out_dir / name).exists() or (out_dir / name).is_symlink()]


# ---------------------------------------------------------------------------------------------
# configs


def saved_config(out_dir: Path) -> Optional[RunConfig]:
    """The run's own config (``out_dir/config.yaml``), or None when there is none."""
    path = out_dir / "config.yaml"
    if not path.exists():
        return None
    try:
        return RunConfig.load(path)
    except ValueError as e:
        raise ValueError(f"{path} (the run's saved config): {e}") from None


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def _resolved_model(cfg: RunConfig) -> dict:
    """The model's full config (preset + overrides), so `depth: 2.0` equals `depth: 2` and an
    override equal to the preset's default equals no override."""
    from moh.models import model_config

    try:
        return {"name": cfg.model.name, **to_dict(model_config(cfg.model.name, **cfg.model.overrides))}
    except ValueError:
        return to_dict(cfg.model)


_UNSET = "(not set)"


def config_changes(saved: RunConfig, given: RunConfig) -> dict[str, tuple[Any, Any]]:
    """key -> (saved value, given value) of every difference, bookkeeping keys ignored; a key
    only one side has (a data set argument, say) shows "(not set)" on the other."""
    a = _flat({**to_dict(saved), "model": _resolved_model(saved)})
    b = _flat({**to_dict(given), "model": _resolved_model(given)})
    return {k: (a.get(k, _UNSET), b.get(k, _UNSET)) for k in sorted(set(a) | set(b))
            if k not in _BOOKKEEPING and a.get(k, _UNSET) != b.get(k, _UNSET)}


def check_resume_config(saved: RunConfig, given: RunConfig, where: Path) -> dict[str, tuple[Any, Any]]:
    """The harmless changes of a resume; ValueError naming every other one with both values."""
    changes = config_changes(saved, given)
    conflicts = {k: v for k, v in changes.items() if k not in RESUME_MAY_CHANGE}
    if conflicts:
        def show(v):
            return v if v is _UNSET else repr(v)

        listed = "; ".join(f"{k}: the run has {show(a)}, this command gives {show(b)}" for k, (a, b) in conflicts.items())
        raise ValueError(
            f"resume of {str(where)!r} with another configuration: {listed}. A resume continues the saved run "
            f"({where / 'config.yaml'}); only {', '.join(RESUME_MAY_CHANGE)} may change. Drop the other settings "
            f"(moh train --resume --out {where} needs no config file), or start a new run (another --out, or --overwrite)")
    return changes


def to_save(cfg: RunConfig) -> RunConfig:
    """``cfg`` as config.yaml records it: resume / overwrite describe a command, not the run."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=False, overwrite=False))


# ---------------------------------------------------------------------------------------------
# the checks before anything is built or written


def preflight(cfg: RunConfig) -> Optional[RunConfig]:
    """Read-only checks of ``cfg.train.out_dir`` for ``cfg``: writable; not another run's unless
    resume / overwrite; on resume the saved config agrees with ``cfg``. Returns the saved config
    (None when there is none). Raises ValueError naming the directory."""
    t = cfg.train
    out_dir = check_writable_dir(t.out_dir, "train.out_dir")
    present = run_files(out_dir) if out_dir.is_dir() else []
    if present and not (t.resume or t.overwrite):
        raise ValueError(
            f"train.out_dir {str(out_dir)!r} already holds a run ({', '.join(present)}); pass --resume to continue "
            f"it, --overwrite to replace it (its files are moved to {OVERWRITTEN}/ and deleted when the new run "
            f"finishes), or choose another --out")
    if out_dir.is_dir() and not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"train.out_dir {str(out_dir)!r} is not writable")
    if not t.resume:
        return None
    saved = saved_config(out_dir)
    if saved is not None:
        check_resume_config(saved, cfg, out_dir)
    elif (out_dir / "checkpoints").is_dir():
        log.warning("resume: %s has checkpoints but no config.yaml; the configuration cannot be compared", out_dir)
    return saved


# ---------------------------------------------------------------------------------------------
# the lock and the files of a starting run


class RunLock:
    """An exclusive ``flock`` on ``<out_dir>/.lock`` for the life of one run (this process's;
    other processes of the same run do not take it). ``acquire`` creates ``out_dir`` if needed and
    remembers whether it did, so ``release(discard=True)`` can remove what a run that never
    started created."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.fd: Optional[int] = None
        self.created = False
        self.started = False  # set once the run writes into out_dir: release() then keeps what is there

    def acquire(self) -> "RunLock":
        self.created = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / LOCK
        if path.is_symlink():
            raise ValueError(f"{path} is a symbolic link; refusing to use it as the run's lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ValueError(f"train.out_dir {str(self.out_dir)!r} is in use by another run (pid {holder}); "
                                 f"wait for it to finish or choose another --out") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self, discard: bool = False) -> None:
        """Unlock. ``discard``: the run never started; remove the directory again if this lock
        created it and nothing else was put there."""
        if self.fd is None:
            return
        os.close(self.fd)  # closing the descriptor releases the flock
        self.fd = None
        if discard and self.created:
            (self.out_dir / LOCK).unlink(missing_ok=True)
            try:
                self.out_dir.rmdir()
            except OSError:
                pass

    def __del__(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


def move_aside(out_dir: Path) -> Optional[Path]:
    """``--overwrite``: move the old run's files into ``out_dir/.overwritten/`` (an older
    ``.overwritten`` is deleted first); returns it, or None when there was nothing to move."""
    present = run_files(out_dir)
    if not present:
        return None
    dest = out_dir / OVERWRITTEN
    if dest.exists():
        log.warning("overwrite: deleting %s (the files of a run replaced earlier)", dest)
        shutil.rmtree(dest)
    dest.mkdir()
    for name in present:
        os.rename(out_dir / name, dest / name)
    log.warning("overwrite: moved the old run's %s to %s; deleted when this run finishes", ", ".join(present), dest)
    return dest


def finish_overwrite(out_dir: Path) -> None:
    """Delete the replaced run's files once the new run has finished."""
    dest = out_dir / OVERWRITTEN
    if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest)
        log.info("overwrite: deleted the replaced run's files (%s)", dest)


def record_resume(out_dir: Path, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append one line to ``resumes.jsonl``: the step resumed from and what changed."""
    entry = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid(),
             "changed": {k: [a, b] for k, (a, b) in changes.items()}}
    with open(out_dir / "resumes.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
