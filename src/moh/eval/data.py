"""The data set a trained run is evaluated on (shared by ``moh eval``, ``moh analyze`` and the
benchmarks)."""
from __future__ import annotations

import inspect

from torch.utils.data import Dataset


def eval_dataset(cfg, split: str) -> Dataset:
    """The run's data set on ``split`` without training augmentation (when the set has any)."""
    import moh.data.images  # noqa: F401  (registers the image sets, the ones with augmentation)
    from moh.data import DATASETS, build_dataset

    from moh.train.config import check_data_args

    args = check_data_args(cfg.data.name, cfg.data.args)
    if cfg.data.name in DATASETS and "augment" in inspect.signature(DATASETS.get(cfg.data.name)).parameters:
        args["augment"] = False
    return build_dataset(cfg.data.name, split, **args)
