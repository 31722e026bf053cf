"""What the training engine needs to know about sharded (FSDP2) models.

Three forms of a model reach the engine: a plain module (one process), a DDP replica (accelerate's
``prepare`` under torchrun; the engine keeps the unwrapped module) and an FSDP2 module
(``torch.distributed.fsdp.fully_shard``: each parameter is a ``DTensor`` holding this process's
shard). FSDP2 comes either from accelerate's FSDP config (``fsdp_version: 2``, GPU clusters) or from
``shard_model`` when ``train.fsdp`` is set (any torch.distributed backend, also gloo on CPU: this is
the path the tests exercise).

Checkpoints hold *full* (unsharded) state whatever the form: ``gather_full_state`` and
``load_full_state`` are the one pair of functions that move state in and out, through
``torch.distributed.checkpoint.state_dict``, which handles all three forms. Both are collectives
under torch.distributed: every process must call them.

Optimizer state leaves ``gather_full_state`` in the layout of ``optimizer.state_dict()`` (state
keyed by parameter index, param groups listing indices), so files written from a plain, a DDP or an
FSDP run are the same and load into any of the three.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from moh.layers.block import Block

StateDict = dict[str, Tensor]


# ---------------------------------------------------------------------------------------------
# sharding


def shard_model(model: nn.Module) -> nn.Module:
    """Shard ``model`` in place with FSDP2 and return it: every transformer ``Block`` is one unit
    (its parameters are gathered for its forward and backward only), the root holds the rest
    (embeddings, head, final norm). Build the optimizer *after* this: the parameters are replaced
    by ``DTensor`` shards. Gradients are averaged over processes like DDP's."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("train.fsdp=true needs torch.distributed: launch with torchrun --nproc_per_node N")
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True for an FSDP2 module (its parameters are DTensor shards)."""
    return isinstance(model, FSDPModule) or any(isinstance(p, DTensor) for p in model.parameters())


def local_tensor(t: Tensor) -> Tensor:
    """This process's part of ``t``: the local shard of a DTensor, ``t`` itself otherwise.
    Differentiable, so ``local_tensor(p).sum()`` sends a gradient to the sharded parameter."""
    return t.to_local() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def no_sync(model: nn.Module, accelerator) -> Iterator[None]:
    """Skip the gradient reduction of this backward (gradient accumulation): FSDP2 keeps the
    unsharded gradients until sync is turned back on (what accelerate does for the FSDP2 modules
    it prepares; it does not know the ones ``shard_model`` made); DDP goes through accelerate."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(model):
            yield


def scalar(t: Tensor | float) -> float:
    """A Python float of a 0-dim tensor (a DTensor is gathered first, e.g. a gradient norm)."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return float(t)


# ---------------------------------------------------------------------------------------------
# full state in and out


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names that refer to one tensor (tied weights, e.g. ``embed.weight`` / ``lm_head.weight``),
    sorted; only groups of two or more. A gathered FSDP state dict holds separate copies of them,
    so the writer cannot find them by shared storage as for a plain module."""
    by_id: dict[int, list[str]] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        by_id.setdefault(id(t), []).append(name)
    return [sorted(names) for names in by_id.values() if len(names) > 1]


def gather_full_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> tuple[StateDict, dict]:
    """Full (unsharded) CPU state dicts of ``model`` and ``optimizer`` on rank 0, ``({}, {})`` on
    the other ranks. ``model`` is the plain or FSDP2 module (for DDP: the unwrapped module).
    Collective: every process calls it. Model keys are the plain module's ``state_dict`` keys (tied
    names each present); the optimizer dict has the layout of ``optimizer.state_dict()``."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    if optimizer is None:
        return model_sd, {}
    return model_sd, _by_index(get_optimizer_state_dict(model, optimizer, options=opts))


def load_full_state(model: nn.Module, model_sd: StateDict, optimizer: Optional[torch.optim.Optimizer] = None,
                    optim_sd: Optional[dict] = None) -> None:
    """Load full state dicts (as ``gather_full_state`` returns them on rank 0) into ``model`` and
    ``optimizer``; every process passes the same full dicts and keeps its shard. Collective.
    ``model_sd`` must name every entry of the model's state dict (tied names included) with its
    shape and a dtype that casts safely, and nothing else; ``optim_sd`` must hold state of the
    optimizer's parameters with their shapes: otherwise a ValueError names the tensors that do not
    fit, before anything is loaded."""
    check_model_state(model, model_sd)
    if optimizer is not None:
        check_optimizer_state(model, optimizer, optim_sd)
    opts = StateDictOptions(full_state_dict=True, strict=False)
    missing, unexpected = set_model_state_dict(model, model_sd, options=opts)
    if missing or unexpected:  # cannot happen after check_model_state; kept as a second guard
        raise ValueError(f"weights do not fit the model: {_mismatch_text(sorted(missing), sorted(unexpected), [])}")
    if optimizer is not None:
        names = _param_names(model, optimizer)
        tuples = [{k for k, v in g.items() if isinstance(v, tuple)} for g in optimizer.param_groups]
        set_optimizer_state_dict(model, optimizer, _by_name(optim_sd, names), options=opts)
        for group, keys in zip(optimizer.param_groups, tuples):  # DCP hands tuples back as lists (betas)
            group.update({k: tuple(group[k]) for k in keys})


# Known wrappers that put a name component in front of the plain module's names (torch.compile,
# activation checkpointing); torch.distributed.checkpoint drops them the same way.
_WRAPPER_PARTS = ("_orig_mod", "_checkpoint_wrapped_module")


def expected_state(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (full shape, dtype) of every entry of ``model``'s state dict, read from the model
    itself (an FSDP2 DTensor reports its full shape). No collective."""
    out = {}
    for name, t in model.state_dict().items():
        name = ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)
        out[name] = (tuple(t.shape), t.dtype)
    return out


def castable(src: torch.dtype, dst: torch.dtype) -> bool:
    """A tensor of dtype ``src`` may be loaded into one of ``dst``: the same dtype, or floating
    point into floating point (precision changes, the meaning does not). Integers, booleans and
    floats never turn into one another."""
    return src == dst or (src.is_floating_point and dst.is_floating_point) or (src.is_complex and dst.is_complex)


def check_model_state(model: nn.Module, model_sd: StateDict) -> None:
    """ValueError naming the missing, unexpected, mis-shaped and wrongly typed tensors of
    ``model_sd`` against ``model``'s own state dict (torch's ``set_model_state_dict`` fills the
    caller's dict with the model's own tensors first, so its missing-keys report cannot be relied
    on). Tied names must all be present (``checkpoint.read_model_file`` puts them back)."""
    want = expected_state(model)
    missing = sorted(set(want) - set(model_sd))
    unexpected = sorted(set(model_sd) - set(want))
    bad = []
    for name in sorted(set(want) & set(model_sd)):
        shape, dtype = want[name]
        t = model_sd[name]
        if not isinstance(t, Tensor):
            bad.append(f"{name} is a {type(t).__name__}, not a tensor")
        elif tuple(t.shape) != shape:
            bad.append(f"{name} has shape {tuple(t.shape)} in the file, {shape} in the model")
        elif not castable(t.dtype, dtype):
            bad.append(f"{name} is {t.dtype} in the file, {dtype} in the model")
    if missing or unexpected or bad:
        raise ValueError(f"weights do not fit the model: {_mismatch_text(missing, unexpected, bad)}")


def check_finite(tensors: StateDict, what: str = "weights") -> None:
    """ValueError naming the floating-point tensors that hold NaN or infinity (a diverged or
    damaged file must not load and then report "accuracy 24%, loss nan")."""
    bad = [name for name, t in sorted(tensors.items())
           if isinstance(t, Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{what} hold NaN or infinite values: {_few(bad)}")


def check_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, optim_sd: Optional[dict]) -> None:
    """ValueError unless ``optim_sd`` (``optimizer.state_dict()`` layout) fits ``optimizer``: the
    same parameter groups and sizes, state only for its parameters, per-parameter tensors of the
    parameter's shape."""
    if not isinstance(optim_sd, dict) or "param_groups" not in optim_sd or "state" not in optim_sd:
        raise ValueError("optimizer state is not an optimizer state dict (no param_groups / state)")
    saved = [len(g.get("params", ())) for g in optim_sd["param_groups"]]
    have = [len(g["params"]) for g in optimizer.param_groups]
    if saved != have:
        raise ValueError(f"optimizer state has parameter groups of sizes {saved}, the optimizer {have}")
    shapes = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"]]
    bad = []
    for idx, pstate in optim_sd["state"].items():
        i = int(idx)
        if not 0 <= i < len(shapes):
            bad.append(f"state for parameter {i}, but the optimizer has {len(shapes)}")
            continue
        for key, value in pstate.items():
            if isinstance(value, Tensor) and value.dim() > 0 and tuple(value.shape) != shapes[i]:
                bad.append(f"{i}.{key} has shape {tuple(value.shape)}, the parameter {shapes[i]}")
    if bad:
        raise ValueError(f"optimizer state does not fit the optimizer: {_few(bad)}")


def _few(items: list[str], n: int = 5) -> str:
    """The first ``n`` items, then how many more."""
    head = ", ".join(items[:n])
    return head + (f" and {len(items) - n} more" if len(items) > n else "")


def _mismatch_text(missing: list[str], unexpected: list[str], bad: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
    if bad:
        parts.append(f"{len(bad)} that do not match ({_few(bad)})")
    return "; ".join(parts)


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every parameter of ``optimizer``, in ``optimizer.state_dict()`` index order,
    as torch.distributed.checkpoint spells them (no DDP / activation-checkpoint prefixes)."""
    osd = get_optimizer_state_dict(model, optimizer)  # no gather: only the names are used
    return [name for group in osd["param_groups"] for name in group["params"]]


def _by_index(osd: dict) -> dict:
    """Optimizer state keyed by parameter name -> keyed by index (``optimizer.state_dict()``)."""
    if not osd:  # not rank 0
        return {}
    names = [name for group in osd["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in osd["param_groups"]]
    return {"state": {index[n]: s for n, s in osd["state"].items()}, "param_groups": groups}


def _by_name(osd: dict, names: list[str]) -> dict:
    """Optimizer state keyed by index -> keyed by parameter name (what set_optimizer_state_dict reads)."""
    count = sum(len(g["params"]) for g in osd["param_groups"])
    if count != len(names):
        raise ValueError(f"optimizer state for {count} parameters, but the optimizer has {len(names)}")
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in osd["param_groups"]]
    return {"state": {names[int(i)]: s for i, s in osd["state"].items()}, "param_groups": groups}


def shutdown() -> None:
    """Leave torch.distributed cleanly at the end of a process that trained under it: wait for
    every process, then destroy the group. Without it a process may exit while another still talks
    to it over gloo, and the other aborts ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
