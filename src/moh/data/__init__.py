"""Data sets by name. ``DATASETS.get(name)(split, **args)`` returns a map-style
``torch.utils.data.Dataset`` whose items are dicts of tensors named like the model's forward
arguments (``images``/``labels`` for classifiers, ``input_ids``/``labels`` for decoders), so the
default collate (stacking) makes a batch the model takes as ``model(**batch)``.
Splits are "train" and "test". Register new ones with ``@DATASETS.register("name")``."""
from __future__ import annotations

import importlib
from typing import Callable

from torch.utils.data import Dataset

from moh.registry import Registry

DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")

# modules that register data sets; imported on first use (they may pull in numpy etc.)
_PROVIDERS = ("moh.data.images", "moh.data.recall", "moh.data.synthetic", "moh.data.text.tokens")


def build_dataset(name: str, split: str, **args) -> Dataset:
    for mod in _PROVIDERS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a provider not written yet must not hide the others
            if e.name != mod:
                raise
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}; valid choices: ['train', 'test']")
    return DATASETS.get(name)(split, **args)
