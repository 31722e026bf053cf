"""``moh eval RUN_DIR [--split test] [--backend sparse] [--batch-size N]``: top-1 accuracy, loss and
heads active of a trained run on a split; prints one line and writes ``RUN_DIR/eval_<split>_<backend>.json``
(or ``--out``), atomically and never through a symbolic link. Weights that do not fit the run's
model, or non-finite results, are an error (exit code 2), never a number.

Also ``throughput``: inference images/s of a classifier, used by ``benchmarks/vit_throughput.py``."""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from moh.eval.data import eval_dataset  # noqa: F401  (moh.eval.classify.eval_dataset, as before)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moh.backends import BACKENDS

    p.add_argument("run_dir", help="a finished training run directory (config.yaml + model.safetensors)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="data split (default: test)")
    p.add_argument("--backend", default="sparse", choices=BACKENDS.names(), help="attention backend (default: sparse)")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default: 256)")
    p.add_argument("--max-batches", type=int, default=0, help="stop after N batches (default 0: the whole split)")
    p.add_argument("--out", help="JSON file to write (default: RUN_DIR/eval_<split>_<backend>.json)")
    from moh.eval.fid import add_dit_arguments

    add_dit_arguments(p)  # options only DiT runs use (domain FID, sampling throughput)
    from moh.eval.lm import add_lm_arguments

    add_lm_arguments(p)  # options only language models use (perplexity, lm-eval tasks)


def run(args: argparse.Namespace) -> int:
    from moh.core.attention import set_backend
    from moh.train.engine import evaluate, load_run

    from moh.train.checkpoint import atomic_write_text
    from moh.train.rundir import check_writable_file

    if args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size} must be >= 1")
    if args.max_batches < 0:
        raise ValueError(f"--max-batches={args.max_batches} must be >= 0")
    # where the result goes, checked before the work (a directory, a planted symlink, read-only)
    out = Path(args.out) if args.out else Path(args.run_dir) / f"eval_{args.split}_{args.backend}.json"
    check_writable_file(out, "--out" if args.out else "result file")
    if args.out:
        out.parent.mkdir(parents=True, exist_ok=True)  # checked creatable above; the writer does not create it
    from moh.eval.lm import is_language_model_dir, run_lm_eval

    if is_language_model_dir(args.run_dir):  # a language model: perplexity, heads per layer, lm-eval tasks
        return run_lm_eval(args, out)
    model, cfg = load_run(args.run_dir)
    if getattr(getattr(model, "config", None), "model_type", None) == "moh":  # a language model, yet not seen as one
        raise ValueError(f"{str(Path(args.run_dir) / 'config.json')!r} is missing, unreadable or not model_type "
                         f"'moh', but the run trained the language model {cfg.model.name!r}: the run directory "
                         f"is damaged (its perplexity is scored from config.json and model.safetensors)")
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
    bad = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad or not result.get("n"):
        raise ValueError(f"evaluation of {args.run_dir} on {cfg.data.name}/{args.split} is not a result: "
                         + (f"{', '.join(f'{k}={result[k]}' for k in bad)} (the model's outputs are not finite)" if bad
                            else "no items were evaluated"))
    atomic_write_text(out, json.dumps(result, indent=1))  # never through a symlink; never half-written
    shown = "  ".join(f"{label} {fmt(result[k])}" for k, label, fmt in (
        ("acc", "top-1", lambda v: f"{100 * v:.2f}%"), ("loss", "loss", lambda v: f"{v:.4f}"),
        ("heads_active", "heads active", lambda v: f"{v:.3f}")) if isinstance(result.get(k), (int, float)))
    print(f"{cfg.model.name}  {cfg.data.name}/{args.split}  backend {args.backend}  n={result['n']}  {shown}  "
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
