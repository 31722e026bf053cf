"""``moh analyze`` of a DiT run: which heads the router picks per class and per range of diffusion
timesteps (early denoising = large t, nearly pure noise; late = small t, nearly clean images).

Test images are noised at timesteps drawn inside R equal ranges of [0, num_train_timesteps)
(sample i gets range i mod R, so every range sees every class alike; noise and timesteps from a
generator seeded by ``--seed``), run through the denoiser with their labels (EMA weights), and the
routing is counted per (class, range) with the forward hooks of ``moh.analysis.routing``. Written:

head_load.png, head_choice.png, router_entropy.png, active_fraction.png  per class (paper Fig. 8)
head_load_timestep.png     per layer: timestep ranges x heads, fraction of tokens using each head
head_load_shift.png        per layer: load at the latest minus the earliest range (heads that serve
                           late denoising are positive)
routing_summary.json / routing_timestep.json   the numbers

Shape legend: L layers, G groups, K classes, R timestep ranges, H heads, B batch.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from moh.analysis.routing import RoutingRecord, collect_routing
from moh.models.base import ModelOutput


class NoisedDenoiser(nn.Module):
    """``forward(images, labels, t, noise)``: the DiT's denoiser on ``images`` noised to ``t``
    (no noise of its own), returning only the routings."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, images: Tensor, labels: Tensor, t: Tensor, noise: Tensor, **_) -> ModelOutput:
        x_t = self.dit.scheduler.add_noise(images, noise, t)
        _, routings = self.dit.denoise(x_t, t, labels)
        return ModelOutput(routings=routings)


def timestep_ranges(num_train_timesteps: int, n: int) -> list[tuple[int, int]]:
    """n equal, inclusive ranges (lo, hi) covering [0, num_train_timesteps)."""
    if not isinstance(n, int) or not 1 <= n <= num_train_timesteps:
        raise ValueError(f"timestep ranges={n!r} must be an integer in [1, {num_train_timesteps}]")
    edges = [r * num_train_timesteps // n for r in range(n + 1)]
    return [(edges[r], edges[r + 1] - 1) for r in range(n)]


def noised_batches(loader: DataLoader, ranges: list[tuple[int, int]], seed: int) -> Iterator[dict]:
    """The loader's batches with ``t`` (B,) drawn in range ``i mod R`` of the running sample index
    ``i``, ``noise`` like the images, and ``range`` (B,): reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.tensor([a for a, _ in ranges])
    width = torch.tensor([b - a + 1 for a, b in ranges])
    seen = 0
    for batch in loader:
        B = batch["images"].shape[0]
        r_B = (torch.arange(seen, seen + B) % len(ranges))
        t_B = lo[r_B] + (torch.rand(B, generator=g) * width[r_B]).long()
        noise = torch.randn(batch["images"].shape, generator=g)
        seen += B
        yield dict(batch, t=t_B, noise=noise, range=r_B)


def collect_dit_routing(dit: nn.Module, loader: DataLoader, class_names: list[str], ranges: list[tuple[int, int]],
                        seed: int = 0, max_batches: int = 0) -> RoutingRecord:
    """Routing counts with one group per (class k, range r): group id k * R + r."""
    R = len(ranges)
    names = [f"{c}|t{lo}-{hi}" for c in class_names for lo, hi in ranges]
    return collect_routing(NoisedDenoiser(dit), noised_batches(loader, ranges, seed),
                           group_fn=lambda b: b["labels"] * R + b["range"], group_names=names, max_batches=max_batches)


def marginal(rec: RoutingRecord, K: int, R: int, over: str, names: list[str]) -> RoutingRecord:
    """The (class, range) record summed over the ranges (``over="range"``: groups = classes) or
    over the classes (``over="class"``: groups = ranges)."""
    dim = 2 if over == "range" else 1
    active = rec.active_LGH.view(rec.num_layers, K, R, -1).sum(dim)
    tokens = rec.tokens_LG.view(rec.num_layers, K, R).sum(dim)
    return replace(rec, group_names=list(names), active_LGH=active, tokens_LG=tokens)


def plot_load_shift(rec_t: RoutingRecord, path: Path, title: str) -> Path:
    """Per layer: head load in the latest (smallest t) minus the earliest (largest t) range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    load = rec_t.head_load.numpy()  # (L, R, H)
    shift = load[:, 0] - load[:, -1]  # (L, H)
    L, H = shift.shape
    fig, ax = plt.subplots(figsize=(1.8 + 0.5 * H, 1.2 + 0.38 * L), constrained_layout=True)
    finite = shift[np.isfinite(shift)]
    lim = max(float(np.abs(finite).max()) if finite.size else 0.0, 0.05)
    im = ax.imshow(shift, vmin=-lim, vmax=lim, cmap="coolwarm", aspect="auto", interpolation="nearest")
    for l in range(L):
        for h in range(H):
            if not math.isnan(shift[l, h]):
                ax.text(h, l, f"{shift[l, h]:+.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(H), [f"h{h}" for h in range(H)], fontsize=8)
    ax.set_yticks(range(L), [f"layer {l} ({rec_t.num_shared[l]}s)" for l in range(L)], fontsize=8)
    ax.set_xlabel("head (the first (N)s heads of a layer are shared)", fontsize=8)
    fig.colorbar(im, ax=ax, label="load at small t - load at large t")
    what = f"head load shift: {rec_t.group_names[0]} (late) minus {rec_t.group_names[-1]} (early denoising)"
    ax.set_title(f"{title}\n{what}" if title else what, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace, model: nn.Module, cfg) -> int:
    """``moh analyze`` of a DiT run (called by ``moh.analysis.cli.run``)."""
    from moh.analysis.plots import plot_head_load, write_pictures
    from moh.eval.data import eval_dataset
    from moh.eval.sample import class_names

    model.use_ema().eval()
    data = eval_dataset(cfg, args.split)
    K = model.cfg.num_classes
    ranges = timestep_ranges(model.cfg.num_train_timesteps, getattr(args, "timestep_ranges", 4))
    names = class_names(cfg, K)
    rec = collect_dit_routing(model, DataLoader(data, batch_size=args.batch_size), names, ranges,
                              seed=getattr(args, "seed", 0), max_batches=args.max_batches)
    by_class = marginal(rec, K, len(ranges), "range", names)
    by_t = marginal(rec, K, len(ranges), "class", [f"t {lo}-{hi}" for lo, hi in ranges])
    out = Path(args.out)
    title = f"{cfg.model.name} on {cfg.data.name}/{args.split} (EMA weights, noised inputs)"
    paths = write_pictures(by_class, out, title=title)
    paths.append(plot_head_load(by_t, out / "head_load_timestep.png", title))
    paths.append(plot_load_shift(by_t, out / "head_load_shift.png", title))
    summary = out / "routing_timestep.json"
    summary.write_text(json.dumps({"title": title, "ranges": ranges, **by_t.summary()}, indent=1))
    paths.append(summary)
    act = ", ".join(f"{a:.2f}" for a in by_class.active_fraction.tolist())
    print(f"{title}: {int(by_class.tokens_LG[0].sum())} tokens, {rec.batches} batches, {len(ranges)} timestep ranges; "
          f"heads active per layer [{act}]")
    for p in paths:
        print(f"wrote {p}")
    return 0
