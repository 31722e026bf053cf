"""The one training loop for every model family (accelerate), checkpoints, configs.

``fit``, ``evaluate``, ``load_run`` and ``FitResult`` live in ``moh.train.engine`` and are
imported on first use here (they pull in accelerate)."""
from moh.train.config import DataSpec, LoopConfig, ModelSpec, OptimConfig, RunConfig  # noqa: F401

_ENGINE = ("fit", "evaluate", "load_run", "FitResult")


def __getattr__(name: str):
    if name in _ENGINE:
        from moh.train import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'moh.train' has no attribute {name!r}")
