"""The one training loop for every model family (accelerate), checkpoints, configs."""
from moh.train.config import DataSpec, LoopConfig, ModelSpec, OptimConfig, RunConfig  # noqa: F401
