"""A fake Fashion-MNIST (IDX files of class-dependent patterns) and a tiny DiT run trained on it."""
import gzip
import struct
from pathlib import Path

import numpy as np

from moh.cli import main as moh_main

REPO = Path(__file__).parents[2]
CONFIG = REPO / "configs" / "dit-fmnist-tiny-moh90.yaml"
TINY_DIT = "model.overrides={dim: 32, depth: 2, num_heads: 4, layer_heads: [[1, 2], [4, 0]], patch_size: 7}"


def _idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">i", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_fake_fmnist(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    """root/fashion-mnist/*-idx*-ubyte.gz: class c is a bright bar in row band c, plus noise."""
    rng = np.random.default_rng(0)
    d = root / "fashion-mnist"
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c : 5 + 2 * c, 4:24] = 230
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            (d / f"{split}-{kind}-ubyte.gz").write_bytes(gzip.compress(_idx(arr)))
    return root


def train_tiny_dit(root: Path, out_dir: Path, *extra: str) -> Path:
    rc = moh_main(["train", str(CONFIG), "--set", TINY_DIT, "--set", f"data.args={{root: {root}, augment: false}}",
                   "--set", "train.steps=4", "--set", "train.batch_size=16", "--set", "train.save_every=0",
                   "--set", "optim.warmup_steps=1", "--set", "train.eval_batches=1", "--set", "train.log_every=2",
                   "--set", f"train.out_dir={out_dir}", *extra])
    assert rc == 0
    return out_dir
