"""``moh eval RUN_DIR [--split test] [--backend sparse] [--batch-size N]``: top-1 accuracy, loss and
heads active of a trained run on a split; prints one line and writes ``RUN_DIR/eval_<split>_<backend>.json``.

Also ``throughput``: inference images/s of a classifier, used by ``benchmarks/vit_throughput.py``."""
from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moh.backends import BACKENDS

    p.add_argument("run_dir", help="a finished training run directory (config.yaml + model.safetensors)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="data split (default: test)")
    p.add_argument("--backend", default="sparse", choices=BACKENDS.names(), help="attention backend (default: sparse)")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default: 256)")
    p.add_argument("--max-batches", type=int, default=0, help="stop after N batches (default 0: the whole split)")
    from moh.eval.fid import add_dit_arguments

    add_dit_arguments(p)  # options only DiT runs use (domain FID, sampling throughput)


def eval_dataset(cfg, split: str) -> Dataset:
    """The run's data set on ``split`` without training augmentation (when the set has any)."""
    import moh.data.images  # noqa: F401  (registers the image sets, the ones with augmentation)
    from moh.data import DATASETS, build_dataset

    args = dict(cfg.data.args)
    if cfg.data.name in DATASETS and "augment" in inspect.signature(DATASETS.get(cfg.data.name)).parameters:
        args["augment"] = False
    return build_dataset(cfg.data.name, split, **args)


def run(args: argparse.Namespace) -> int:
    from moh.core.attention import set_backend
    from moh.train.engine import evaluate, load_run

    if args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size} must be >= 1")
    model, cfg = load_run(args.run_dir)
    from moh.models.dit import DiT

    if isinstance(model, DiT):  # a denoiser: domain FID and sampling throughput instead of top-1
        from moh.eval.fid import run_dit_eval

        return run_dit_eval(args, model, cfg)
    set_backend(model, args.backend)
    data = eval_dataset(cfg, args.split)
    t0 = time.perf_counter()
    result = evaluate(model, data, batch_size=args.batch_size, max_batches=args.max_batches)
    seconds = time.perf_counter() - t0
    result.update(run_dir=str(args.run_dir), model=cfg.model.name, data=cfg.data.name, split=args.split,
                  backend=args.backend, seconds=round(seconds, 3), threads=torch.get_num_threads())
    out = Path(args.run_dir) / f"eval_{args.split}_{args.backend}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"{cfg.model.name}  {cfg.data.name}/{args.split}  backend {args.backend}  n={result['n']}  "
          f"top-1 {100 * result['acc']:.2f}%  loss {result['loss']:.4f}  heads active {result['heads_active']:.3f}  "
          f"({seconds:.1f}s)  -> {out}")
    return 0


@torch.no_grad()
def inference_seconds(model: nn.Module, images: torch.Tensor, batch_size: int) -> float:
    """Wall time of one eval-mode pass over ``images`` (N, C, H, W) in batches of ``batch_size``."""
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    for i in range(0, len(images), batch_size):
        model(images=images[i : i + batch_size])
    seconds = time.perf_counter() - t0
    model.train(was_training)
    return seconds


def throughput(model: nn.Module, images: torch.Tensor, batch_size: int, repeats: int = 3) -> float:
    """Inference images/s: ``len(images)`` over the median of ``repeats`` passes."""
    times = sorted(inference_seconds(model, images, batch_size) for _ in range(repeats))
    return len(images) / times[len(times) // 2]
