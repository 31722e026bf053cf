"""Inference throughput (images/s) of trained ViT runs, per attention backend, side by side.

    OMP_NUM_THREADS=1 python benchmarks/vit_throughput.py runs/fmnist-mha-s1 runs/fmnist-moh75-s1 \\
        runs/fmnist-moh50-s1 --backends sparse masked --images 2048 --batch-size 256 --repeats 5

Every (run, backend) pair is timed once per round, in turn, for ``--repeats`` rounds, so machine
noise hits all of them alike; the median is reported with its ratio to the first row (the baseline).
Inputs are the first ``--images`` images of each run's evaluation split (no augmentation).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from moh.core.attention import set_backend
from moh.eval.classify import inference_seconds
from moh.eval.data import eval_dataset
from moh.train.engine import load_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run directories; the first is the baseline")
    p.add_argument("--backends", nargs="+", default=["sparse", "masked"])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    cases = []  # (label, model, images)
    for run in args.runs:
        model, cfg = load_run(run)
        data = eval_dataset(cfg, cfg.data.eval_split)
        n = min(args.images, len(data))
        images = torch.stack([data[i]["images"] for i in range(n)])
        for backend in args.backends:
            m, _ = load_run(run)  # one model per backend: set_backend changes the modules' configs
            set_backend(m, backend)
            cases.append((f"{cfg.model.name} [{backend}]", m, images))
    for _, m, images in cases:  # warm-up
        inference_seconds(m, images[: args.batch_size], args.batch_size)
    times = {label: [] for label, _, _ in cases}
    for _ in range(args.repeats):
        for label, m, images in cases:
            times[label].append(inference_seconds(m, images, args.batch_size))
    print(f"threads={torch.get_num_threads()} images={len(cases[0][2])} batch={args.batch_size} repeats={args.repeats} "
          f"torch={torch.__version__}")
    base = None
    print(f"{'model [backend]':36s} {'images/s':>10s} {'vs first':>9s}")
    for label, _, images in cases:
        ips = len(images) / statistics.median(times[label])
        base = base or ips
        print(f"{label:36s} {ips:10.0f} {ips / base:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
