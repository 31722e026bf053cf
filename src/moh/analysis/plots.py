"""Pictures of a ``RoutingRecord`` (matplotlib, Agg backend; no display needed).

head_load.png        per layer: groups x heads heatmap of the fraction of the group's tokens
                     that use each head (the paper's Fig. 8 shows this per ImageNet class)
head_choice.png      layers x heads heatmap: fraction of all tokens that use each head
router_entropy.png   mean router entropy per layer against the uniform maximum log(E)
active_fraction.png  measured fraction of heads active per layer against the configured one
routing_summary.json the numbers behind the pictures (and which pictures were skipped, and why)

A picture with nothing to show is not drawn (a logged note and ``skipped`` in the summary say
why): router_entropy.png when no layer has router probabilities (multi-head attention, the
parameter-free query_norm router), active_fraction.png when every layer uses exactly its
configured fraction (multi-head attention, a fixed top-k). Figures are saved with a tight
bounding box (no clipped titles or colour-bar labels), through a temporary file and a rename.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never opens a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moh.analysis.routing import RoutingRecord  # noqa: E402

_CMAP = "viridis"
log = logging.getLogger(__name__)


def _save(fig, path: Path) -> Path:
    """Save with a tight bounding box (nothing clipped) via a temporary file and a rename."""
    path = Path(path)
    if path.is_symlink() or path.is_dir():
        raise ValueError(f"{str(path)!r} is a {'symbolic link' if path.is_symlink() else 'directory'}; refusing to write it")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", pad_inches=0.15)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def _head_labels(H: int, num_shared: int) -> list[str]:
    """'s0', 's1' for shared heads, 'r2', ... for routed ones."""
    return [f"{'s' if h < num_shared else 'r'}{h}" for h in range(H)]


def _title(run: str, what: str) -> str:
    """The run's title on its own line, so narrow figures do not clip it."""
    return f"{run}\n{what}" if run else what


def _short(name: str, n: int = 14) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def plot_head_load(rec: RoutingRecord, path: Path, title: str) -> Path:
    load = rec.head_load.numpy()  # (L, G, H)
    L, G, H = load.shape
    cols = min(L, 3)
    rows = math.ceil(L / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.0 + 0.42 * H * cols + 1.2, 0.9 + (0.28 * G + 0.9) * rows),
                             squeeze=False, constrained_layout=True)
    im = None
    for l in range(rows * cols):
        ax = axes[l // cols][l % cols]
        if l >= L:
            ax.axis("off")
            continue
        im = ax.imshow(load[l], vmin=0.0, vmax=1.0, cmap=_CMAP, aspect="auto", interpolation="nearest")
        ax.set_title(f"layer {l}  ({rec.num_shared[l]} shared)", fontsize=9)
        ax.set_xticks(range(H), _head_labels(H, rec.num_shared[l]), fontsize=7)
        ax.set_yticks(range(G), [_short(g) for g in rec.group_names] if l % cols == 0 else [""] * G, fontsize=7)
        if l // cols == rows - 1 or l + cols >= L:
            ax.set_xlabel("head (s = shared, r = routed)", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="fraction of tokens")
    fig.suptitle(_title(title, "head load per group (fraction of the group's tokens using each head)"), fontsize=11)
    return _save(fig, path)


def plot_head_choice(rec: RoutingRecord, path: Path, title: str) -> Path:
    frac = rec.choice_fraction.numpy()  # (L, H)
    L, H = frac.shape
    fig, ax = plt.subplots(figsize=(1.8 + 0.5 * H, 1.2 + 0.38 * L), constrained_layout=True)
    im = ax.imshow(frac, vmin=0.0, vmax=1.0, cmap=_CMAP, aspect="auto", interpolation="nearest")
    for l in range(L):
        for h in range(H):
            ax.text(h, l, f"{frac[l, h]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if frac[l, h] > 0.6 else "white")
    ax.set_xticks(range(H), [f"h{h}" for h in range(H)], fontsize=8)
    ax.set_yticks(range(L), [f"layer {l} ({rec.num_shared[l]}s)" for l in range(L)], fontsize=8)
    ax.set_xlabel("head (the first (N)s heads of a layer are shared)", fontsize=8)
    fig.colorbar(im, ax=ax, label="fraction of tokens")
    ax.set_title(_title(title, "how often each head is used"), fontsize=10)
    return _save(fig, path)


def _layer_bar_figure(L: int):
    """A figure with one x position per layer (bar charts of per-layer numbers)."""
    fig, ax = plt.subplots(figsize=(max(4.8, 1.5 + 0.55 * L), 3.4), constrained_layout=True)
    ax.set_xticks(np.arange(L), [str(l) for l in range(L)])
    ax.set_xlabel("layer")
    return fig, ax


def _finish_layer_bars(fig, ax, path: Path, title: str, what: str) -> Path:
    # the legend goes under the axes: over the bars it hides them, beside a narrow figure it is clipped
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    ax.set_title(_title(title, what), fontsize=10)
    return _save(fig, path)


def plot_entropy(rec: RoutingRecord, path: Path, title: str) -> Path:
    ent = rec.entropy.numpy()
    L = len(ent)
    fig, ax = _layer_bar_figure(L)
    x = np.arange(L)
    have = ~np.isnan(ent)
    ax.bar(x[have], ent[have], color="tab:blue", label="mean router entropy")
    max_ent = [math.log(e) if e > 1 else 0.0 for e in rec.num_routed]
    ax.plot(x, max_ent, "k_", markersize=18, mew=2, label="uniform: log(routed heads)")
    for l in np.flatnonzero(~have):
        ax.text(l, 0.02, "no router\nprobabilities", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_ylabel("entropy (nats)")
    ax.set_ylim(0, max(max_ent + [float(np.nanmax(ent)) if have.any() else 0.0, 0.1]) * 1.35)
    return _finish_layer_bars(fig, ax, path, title, "router entropy per layer")


def plot_active_fraction(rec: RoutingRecord, path: Path, title: str) -> Path:
    act = rec.active_fraction.numpy()
    L = len(act)
    fig, ax = _layer_bar_figure(L)
    x = np.arange(L)
    ax.bar(x, act, color="tab:green", label="measured")
    ax.plot(x, rec.expected_fraction, "k_", markersize=18, mew=2, label="configured")
    for l, a in enumerate(act):
        ax.text(l, a / 2, f"{a:.2f}", ha="center", va="center", fontsize=7, color="white")  # clear of the marker
    ax.set_ylabel("fraction of heads active")
    ax.set_ylim(0, 1.3)
    return _finish_layer_bars(fig, ax, path, title, "heads active per layer")


def nothing_to_show(rec: RoutingRecord) -> dict[str, str]:
    """picture name -> why it would show nothing for ``rec`` (see the module docstring)."""
    skip = {}
    if bool(np.isnan(rec.entropy.numpy()).all()):
        skip["router_entropy.png"] = ("no layer has router probabilities (multi-head attention or a "
                                      "parameter-free router): there is no entropy to show")
    act, want = rec.active_fraction.numpy(), np.asarray(rec.expected_fraction, dtype=float)
    if act.shape == want.shape and np.allclose(act, want, atol=1e-6, rtol=0):
        skip["active_fraction.png"] = ("every layer uses exactly its configured fraction of heads "
                                       f"({', '.join(f'{a:.2f}' for a in act)}; multi-head attention or a fixed "
                                       "top-k): nothing varies")
    return skip


def write_pictures(rec: RoutingRecord, out_dir: str | Path, title: str = "") -> list[Path]:
    """Write the pictures that have something to show and ``routing_summary.json`` into
    ``out_dir``; returns their paths (skipped pictures are logged and listed in the summary)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skip = nothing_to_show(rec)
    plots = [("head_load.png", plot_head_load), ("head_choice.png", plot_head_choice),
             ("router_entropy.png", plot_entropy), ("active_fraction.png", plot_active_fraction)]
    paths = []
    for name, plot in plots:
        if name in skip:
            log.info("not drawing %s: %s", name, skip[name])
            continue
        paths.append(plot(rec, out / name, title))
    summary = out / "routing_summary.json"
    from moh.train.checkpoint import atomic_write_text

    atomic_write_text(summary, json.dumps({"title": title, **rec.summary(), "skipped": skip}, indent=1))
    paths.append(summary)
    return paths
