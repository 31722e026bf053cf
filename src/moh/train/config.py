"""Typed training configs: ``RunConfig`` <-> YAML <-> ``--set a.b=value`` overrides.

YAML form (every section optional except model and data):
    model: {name: moh-vit-tiny-50, overrides: {drop_path: 0.1}}
    data:  {name: fashion-mnist, args: {root: data}}
    optim: {lr: 1.0e-3, weight_decay: 0.05, warmup_steps: 100, ...}
    train: {steps: 1000, batch_size: 128, out_dir: runs/x, ...}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from moh.config import apply_overrides, from_dict, load_yaml, save_yaml, to_dict


@dataclass
class ModelSpec:
    name: str = "moh-vit-tiny-50"  # a preset from moh.models.list_models()
    overrides: dict = field(default_factory=dict)  # fields of the preset's config


@dataclass
class DataSpec:
    name: str = "random-images"  # a name in moh.data.DATASETS
    args: dict = field(default_factory=dict)  # keyword arguments of the data set
    eval_split: str = "test"


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0  # max gradient norm; 0 disables


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
    resume: bool = False
    fsdp: bool = False  # shard with FSDP2 (each block + the root) under torchrun; see moh.train.distributed
    progress: bool = True
    num_workers: int = 0
    metrics_csv: bool = True
    tensorboard: bool = True  # used when tensorboard is installed


@dataclass
class RunConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)

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
