"""Tiny random data sets for tests and smoke runs (no files)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from moh.data import DATASETS


class RandomImages(Dataset):
    """Random images with labels that depend on the image (learnable): label = argmax of the mean
    of ``num_classes`` vertical bands of the first channel."""

    def __init__(self, split: str, size: int = 256, image_size: int = 28, in_chans: int = 1, num_classes: int = 10, seed: int = 0):
        g = torch.Generator().manual_seed(seed + (split == "test") * 1000)
        self.images = torch.randn(size, in_chans, image_size, image_size, generator=g)
        bands = self.images[:, 0].mean(1)  # (N, W)
        edges = torch.linspace(0, image_size, num_classes + 1).long()
        scores = torch.stack([bands[:, edges[i] : edges[i + 1]].mean(1) for i in range(num_classes)], 1)
        self.labels = scores.argmax(1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"images": self.images[i], "labels": self.labels[i]}


DATASETS.register("random-images")(RandomImages)
