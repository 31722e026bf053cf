"""``moh analyze RUN_DIR --out DIR [--split test] [--max-batches N]``: routing pictures of a trained
run (paper Fig. 8: head load per class) and a JSON summary. Classifier data sets are grouped by
class; data sets with per-token labels (decoders) form one group."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished training run directory (config.yaml + model.safetensors)")
    p.add_argument("--out", required=True, help="directory for the PNGs and routing_summary.json")
    p.add_argument("--split", default="test", choices=["train", "test"], help="data split (default: test)")
    p.add_argument("--max-batches", type=int, default=0, help="stop after N batches (default 0: the whole split)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size (default: 256)")


def run(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from moh.analysis import collect_routing, write_pictures
    from moh.eval.data import eval_dataset
    from moh.train.engine import load_run

    from moh.train.rundir import check_writable_dir

    if args.max_batches < 0 or args.batch_size < 1:
        raise ValueError(f"--max-batches={args.max_batches} must be >= 0 and --batch-size={args.batch_size} >= 1")
    check_writable_dir(args.out, "--out")  # before the work, not after it
    model, cfg = load_run(args.run_dir)
    from moh.models.dit import DiT

    if isinstance(model, DiT):  # head load per class and per timestep range of noised inputs
        from moh.analysis import dit

        return dit.run(args, model, cfg)
    data = eval_dataset(cfg, args.split)
    classes = list(getattr(data, "classes", ()) or ())

    def by_class(batch: dict):
        labels = batch.get("labels")
        return labels if labels is not None and labels.dim() == 1 else None

    group_fn = by_class if classes else None
    rec = collect_routing(model, DataLoader(data, batch_size=args.batch_size), group_fn=group_fn,
                          group_names=classes or None, max_batches=args.max_batches)
    title = f"{cfg.model.name} on {cfg.data.name}/{args.split}"
    paths = write_pictures(rec, Path(args.out), title=title)
    act = ", ".join(f"{a:.2f}" for a in rec.active_fraction.tolist())
    print(f"{title}: {int(rec.tokens_LG[0].sum())} tokens, {rec.batches} batches; heads active per layer [{act}]")
    for p in paths:
        print(f"wrote {p}")
    return 0
