"""Typed training configs: ``RunConfig`` <-> YAML <-> ``--set a.b=value`` overrides.

YAML form (every section optional except model and data):
    model: {name: moh-vit-tiny-50, overrides: {drop_path: 0.1}}
    data:  {name: fashion-mnist, args: {root: data}}
    optim: {lr: 1.0e-3, weight_decay: 0.05, warmup_steps: 100, ...}
    train: {steps: 1000, batch_size: 128, out_dir: runs/x, ...}
"""
from __future__ import annotations

import inspect
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from moh.config import apply_overrides, coerce_value, from_dict, load_yaml, save_yaml, to_dict

# Every value is checked when a config is built (``__post_init__``), so a config that exists is
# one the trainer can run: a bad number is a ValueError naming the key and the value.


def _need(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} {rule}")


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _at_least(section: Any, prefix: str, low: int, *names: str) -> None:
    for name in names:
        v = getattr(section, name)
        _need(isinstance(v, int) and not isinstance(v, bool) and v >= low, f"{prefix}.{name}", v,
              f"must be an integer >= {low}")


@dataclass
class ModelSpec:
    name: str = "moh-vit-tiny-50"  # a preset from moh.models.list_models(), or hf:DIR (a moh model directory)
    overrides: dict = field(default_factory=dict)  # fields of the preset's config
    lora: dict = field(default_factory=dict)  # LoRA adapters (PEFT): r, alpha, dropout, targets (moh.train.finetune)
    trainable: list = field(default_factory=list)  # fnmatch patterns of parameters to train (empty: all / LoRA's)

    def __post_init__(self) -> None:
        _need(isinstance(self.name, str) and self.name.strip() != "", "model.name", self.name, "must be a preset name")
        _need(isinstance(self.overrides, dict), "model.overrides", self.overrides, "must be a mapping")
        _need(isinstance(self.lora, dict), "model.lora", self.lora, "must be a mapping (r, alpha, dropout, targets)")
        _need(isinstance(self.trainable, list) and all(isinstance(p, str) for p in self.trainable), "model.trainable",
              self.trainable, "must be a list of parameter name patterns")
        if self.lora:
            from moh.train.finetune import check_lora

            check_lora(self.lora)


@dataclass
class DataSpec:
    name: str = "random-images"  # a name in moh.data.DATASETS
    args: dict = field(default_factory=dict)  # keyword arguments of the data set
    eval_split: str = "test"

    def __post_init__(self) -> None:
        _need(isinstance(self.name, str) and self.name.strip() != "", "data.name", self.name, "must be a data set name")
        _need(isinstance(self.args, dict), "data.args", self.args, "must be a mapping")
        _need(self.eval_split in ("train", "test"), "data.eval_split", self.eval_split, "must be 'train' or 'test'")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0  # max gradient norm; 0 disables

    def __post_init__(self) -> None:
        _need(_is_num(self.lr) and self.lr > 0, "optim.lr", self.lr, "must be a finite number > 0")
        _need(_is_num(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay", self.weight_decay,
              "must be a finite number >= 0")
        _need(isinstance(self.betas, (list, tuple)) and len(self.betas) == 2
              and all(_is_num(b) and 0 <= b < 1 for b in self.betas), "optim.betas", self.betas,
              "must be two numbers in [0, 1)")
        _need(_is_num(self.eps) and self.eps > 0, "optim.eps", self.eps, "must be a finite number > 0")
        _at_least(self, "optim", 0, "warmup_steps")
        _need(_is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio,
              "must be in [0, 1]")
        _need(_is_num(self.grad_clip) and self.grad_clip >= 0, "optim.grad_clip", self.grad_clip,
              "must be a finite number >= 0 (0 disables clipping)")


@dataclass
class LoopConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # per process, per micro-batch
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 0  # 0: the whole eval split
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    out_dir: str = "runs/default"
    resume: bool = False  # continue the run in out_dir (its config.yaml decides; see moh.train.rundir)
    overwrite: bool = False  # replace the run in out_dir (its files are moved to out_dir/.overwritten/)
    fsdp: bool = False  # shard with FSDP2 (each block + the root) under torchrun; see moh.train.distributed
    progress: bool = True
    num_workers: int = 0
    metrics_csv: bool = True
    tensorboard: bool = True  # used when tensorboard is installed

    def __post_init__(self) -> None:
        _at_least(self, "train", 1, "steps", "batch_size", "grad_accum", "log_every")
        _at_least(self, "train", 0, "eval_every", "eval_batches", "save_every", "keep_last", "num_workers")
        _need(isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**32,
              "train.seed", self.seed, "must be an integer in [0, 2**32)")
        _need(isinstance(self.out_dir, str) and self.out_dir.strip() != "" and "\0" not in self.out_dir,
              "train.out_dir", self.out_dir, "must be a directory path")
        _need(not (self.resume is True and self.overwrite is True), "train.overwrite", self.overwrite,
              "and train.resume=true exclude each other (continue the run, or replace it)")


@dataclass
class RunConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every value (again: a config may have been changed after it was built)."""
        for section in (self.model, self.data, self.optim, self.train):
            section.__post_init__()
        _need(self.optim.warmup_steps <= self.train.steps, "optim.warmup_steps", self.optim.warmup_steps,
              f"is longer than the run (train.steps={self.train.steps})")

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        return from_dict(cls, data)

    @classmethod
    def load(cls, path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> "RunConfig":
        data = load_yaml(path) if path is not None else {}
        apply_overrides(data, overrides or [])
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def save(self, path: str | Path) -> None:
        save_yaml(self, path)


def check_data_args(name: str, args: dict) -> dict:
    """``args`` checked against data set ``name``'s constructor: an unknown key is a ValueError
    naming it and the valid ones; values are converted to the annotated types (``size: 64.0`` ->
    64) and a wrong type is a ValueError naming ``data.args.<key>``. Returns the converted args."""
    import importlib

    from moh.data import _PROVIDERS, DATASETS

    for mod in _PROVIDERS:  # as build_dataset does: register every data set
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    ctor = DATASETS.get(name)  # raises naming the valid data sets
    target = ctor.__init__ if inspect.isclass(ctor) else ctor
    params = dict(inspect.signature(target).parameters)
    params.pop("self", None)
    params.pop("split", None)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(args)
    unknown = sorted(set(args) - set(params), key=str)
    if unknown:
        raise ValueError(f"unknown data.args key(s) {[f'data.args.{k}' for k in unknown]} for data set {name!r}; "
                         f"valid keys: {sorted(params)}")
    try:
        hints = typing.get_type_hints(target)
    except (NameError, TypeError):  # annotations that do not evaluate: no conversion
        hints = {}
    out = {}
    for key, value in args.items():
        tp = hints.get(key)
        out[key] = value if tp is None else coerce_value(value, tp, f"data.args.{key}")
    return out
