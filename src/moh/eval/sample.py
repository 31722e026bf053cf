"""``moh sample RUN_DIR --classes 0,1,2 --cfg-scale 4 --steps 50 [--scheduler ddim|dpm|ddpm]
[--seed 0] [--out DIR] [--per-class 8] [--backend sparse] [--batch-size 64] [--no-ema]``:
class-conditional samples of a trained DiT run as PNG grids, one per class
(``class_<i>_<name>.png``) and all classes together (``grid.png``, one row per class), plus
``samples.json`` (settings, seconds, images/s). Uses the run's EMA weights unless ``--no-ema``.

Every input is checked (class indices, cfg scale, steps, counts) before anything is written.
Images of class c come from a generator seeded by (seed, c): the same class gives the same
images whatever other classes are asked for.

Shape legend: N images, C channels, Hi x Wi image size.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moh.backends import BACKENDS
    from moh.diffusion import SCHEDULERS

    p.add_argument("run_dir", help="a finished DiT training run directory (config.yaml + model.safetensors)")
    p.add_argument("--classes", default="all", help="comma-separated class indices, or 'all' (default)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale (1: conditional; default 4)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS), help="sampler (default ddim)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/samples)")
    p.add_argument("--per-class", type=int, default=8, help="images per class (default 8)")
    p.add_argument("--backend", default="sparse", choices=BACKENDS.names(), help="attention backend (default sparse)")
    p.add_argument("--batch-size", type=int, default=64, help="images per denoiser batch (default 64)")
    p.add_argument("--no-ema", action="store_true", help="use the trained weights instead of their EMA")


# ---------------------------------------------------------------------------------------------
# generation


def parse_classes(text: str, num_classes: int) -> list[int]:
    """'all' or '0,3,7' -> class indices; ValueError naming a bad one."""
    if text.strip() == "all":
        return list(range(num_classes))
    out = []
    for part in text.split(","):
        try:
            c = int(part.strip())
        except ValueError:
            raise ValueError(f"class index {part.strip()!r} is not an integer (--classes takes e.g. 0,1,2 or all)") from None
        if not 0 <= c < num_classes:
            raise ValueError(f"class index {c} is not in [0, {num_classes}) (the model has {num_classes} classes)")
        out.append(c)
    if len(set(out)) != len(out):
        raise ValueError(f"--classes {text!r} names a class twice")
    return out


def class_generator(seed: int, c: int) -> torch.Generator:
    """The CPU generator of class ``c``'s images."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, c]).generate_state(1, np.uint64)[0]))


@torch.no_grad()
def generate(model, classes: Sequence[int], per_class: int, *, cfg_scale: float = 4.0, steps: int = 50,
             scheduler: str = "ddim", seed: int = 0, batch_size: int = 64) -> Tensor:
    """``per_class`` images of each class (N = len(classes) * per_class, class-major order), in the
    training data's scale: (N, C, Hi, Wi) on the model's device."""
    from moh.diffusion import check_sampling, sample_images

    c = model.cfg
    check_sampling(steps=steps, cfg_scale=cfg_scale, labels=list(classes), num_classes=c.num_classes)
    if not math.isfinite(cfg_scale):  # inf: every image NaN, saved as black squares
        raise ValueError(f"cfg scale={cfg_scale!r} must be a finite number >= 0")
    for name, v in (("per_class", per_class), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for cls in classes:
        g = class_generator(seed, cls)
        for start in range(0, per_class, batch_size):
            n = min(batch_size, per_class - start)
            labels = torch.full((n,), cls, dtype=torch.long, device=device)
            out.append(sample_images(model.predict_noise, labels, (c.in_chans, c.image_size, c.image_size),
                                     train_scheduler=model.scheduler, null_class=c.num_classes, cfg_scale=cfg_scale,
                                     steps=steps, scheduler=scheduler, generator=g))
    model.train(was_training)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# pictures


def data_scale(cfg) -> tuple[tuple, tuple]:
    """(mean, std) per channel that the run's data set standardised pixels in [0, 1] with;
    (0.5,), (0.5,) (images in [-1, 1]) for sets without them."""
    from moh.data.images import SOURCES

    src = SOURCES.get(cfg.data.name)
    return (src.mean, src.std) if src is not None else ((0.5,), (0.5,))


def class_names(cfg, num_classes: int) -> list[str]:
    from moh.data.images import SOURCES

    src = SOURCES.get(cfg.data.name)
    if src is not None and len(src.classes) == num_classes:
        return list(src.classes)
    return [str(i) for i in range(num_classes)]


def to_pixels(x_NCHW: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Standardised images -> uint8 (N, Hi, Wi, C)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (x_NCHW.detach().float().cpu() * s + m).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def image_grid(pixels_NHWC: np.ndarray, cols: int, pad: int = 2) -> np.ndarray:
    """Images in rows of ``cols`` with ``pad`` black pixels between them -> (H, W, C) uint8."""
    N, H, W, C = pixels_NHWC.shape
    rows = math.ceil(N / cols)
    grid = np.zeros((rows * (H + pad) + pad, cols * (W + pad) + pad, C), dtype=np.uint8)
    for i in range(N):
        r, c = divmod(i, cols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[y : y + H, x : x + W] = pixels_NHWC[i]
    return grid


def save_png(grid_HWC: np.ndarray, path: Path, scale: int = 1) -> Path:
    """Write a uint8 grid as PNG (grey for one channel), enlarged ``scale`` times (nearest)."""
    from PIL import Image

    img = grid_HWC[..., 0] if grid_HWC.shape[-1] == 1 else grid_HWC
    if scale > 1:
        img = img.repeat(scale, 0).repeat(scale, 1)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")  # written beside and renamed: a planted symlink is replaced
    tmp.unlink(missing_ok=True)
    Image.fromarray(img).save(tmp, format="PNG")
    tmp.replace(path)
    return path


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-").lower()


def write_grids(pixels_NHWC: np.ndarray, classes: Sequence[int], names: Sequence[str], out: Path,
                per_class: int) -> list[Path]:
    """One PNG per class and ``grid.png`` (a row per class); returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    cols = min(per_class, 8)
    scale = 2 if pixels_NHWC.shape[1] <= 32 else 1
    paths = []
    for i, c in enumerate(classes):
        block = pixels_NHWC[i * per_class : (i + 1) * per_class]
        paths.append(save_png(image_grid(block, cols), out / f"class_{c}_{_slug(names[c])}.png", scale))
    paths.append(save_png(image_grid(pixels_NHWC, per_class), out / "grid.png", scale))
    return paths


# ---------------------------------------------------------------------------------------------
# the command


def load_dit_run(run_dir: str, backend: str, ema: bool = True):
    """(model in eval mode with EMA weights unless ``ema`` is False, run config); ValueError if the
    run's model is not a DiT."""
    from moh.core.attention import set_backend
    from moh.models.dit import DiT
    from moh.train.engine import load_run

    model, cfg = load_run(run_dir)
    if not isinstance(model, DiT):
        raise ValueError(f"{run_dir!r} trained {cfg.model.name!r} ({type(model).__name__}), not a DiT")
    if ema:
        model.use_ema()
    set_backend(model, backend)
    return model.eval(), cfg


def check_args(args: argparse.Namespace, num_classes: int) -> list[int]:
    """The class indices; ValueError naming the first bad value of the command line."""
    from moh.diffusion import check_sampling

    classes = parse_classes(args.classes, num_classes)
    check_sampling(steps=args.steps, cfg_scale=args.cfg_scale)
    if not math.isfinite(args.cfg_scale):
        raise ValueError(f"--cfg-scale={args.cfg_scale} must be a finite number >= 0")
    for name in ("per_class", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    return classes


def run(args: argparse.Namespace) -> int:
    model, cfg = load_dit_run(args.run_dir, args.backend, ema=not args.no_ema)
    classes = check_args(args, model.cfg.num_classes)
    out = Path(args.out) if args.out else Path(args.run_dir) / "samples"
    t0 = time.perf_counter()
    x = generate(model, classes, args.per_class, cfg_scale=args.cfg_scale, steps=args.steps, scheduler=args.scheduler,
                 seed=args.seed, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    names = class_names(cfg, model.cfg.num_classes)
    paths = write_grids(to_pixels(x, *data_scale(cfg)), classes, names, out, args.per_class)
    meta = dict(run_dir=str(args.run_dir), model=cfg.model.name, classes=classes, per_class=args.per_class,
                cfg_scale=args.cfg_scale, steps=args.steps, scheduler=args.scheduler, seed=args.seed,
                backend=args.backend, ema=not args.no_ema, seconds=round(seconds, 3),
                images_per_s=round(len(x) / seconds, 3), threads=torch.get_num_threads())
    from moh.train.checkpoint import atomic_write_text

    atomic_write_text(out / "samples.json", json.dumps(meta, indent=1))  # never through a planted symlink
    print(f"{cfg.model.name}: {len(x)} images ({len(classes)} classes x {args.per_class}), {args.scheduler} "
          f"{args.steps} steps, cfg {args.cfg_scale:g}, backend {args.backend}: {seconds:.1f}s "
          f"({len(x) / seconds:.2f} images/s) -> {out}")
    for p in paths:
        log.info("wrote %s", p)
    return 0
