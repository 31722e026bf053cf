"""``moh models``: list presets with their size and head usage."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", action="store_true", help="also build each model and count parameters (slow for large presets)")


def run(args: argparse.Namespace) -> int:
    from moh.models import list_models, model_config

    for name in list_models():
        cfg = model_config(name)
        atts = cfg.attention_configs()
        frac = sum(a.active_heads for a in atts) / sum(a.num_heads for a in atts)  # layers may differ in heads
        line = f"{name:22s} {type(cfg).__name__:14s} depth={cfg.depth:<3d} dim={cfg.dim:<4d} heads={cfg.num_heads:<3d} active={frac:.0%}"
        if args.params:
            line += f" params={sum(p.numel() for p in cfg.build().parameters()) / 1e6:.2f}M"
        print(line)
    return 0
