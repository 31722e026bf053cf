"""Sampling throughput of DiT vs MoH-DiT at the paper's DiT-S/2 and DiT-B/2 sizes: 256x256 images as
DiT samples them (32x32x4 latents, patch 2 -> 256 tokens), random weights, classifier-free guidance
(2B rows per denoiser call), DDIM steps. Variants, measured side by side in one process and
interleaved (A B C ... A B C ...) so that a change in machine load hits them alike:

    MHA          dit-<size>-mha (router all), backend sparse (all heads -> one dense kernel); also
                 backend masked ("MHA masked"); speed_vs_mha is relative to the first
    MoH-90 / 75  moh-dit-<size>-90 / -75 with backends sparse, masked (all heads then zero) and
                 reference (per-head loop; --reference)

A sampling step is timed (median and minimum of --repeats, after a warm-up; on a loaded machine the
minimum is the steadier estimate of the work); images/s is reported for a --steps-step sampling run:
batch / (steps * median step seconds). Writes JSON (--out).

    python benchmarks/dit_throughput.py --sizes s2 b2 --batch 8 --threads 2 --out results/dit_throughput.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

# this directory holds kernels.py, a module name diffusers probes for (the Hugging Face "kernels" package)
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402

from moh.core.attention import set_backend  # noqa: E402
from moh.diffusion import sample_images  # noqa: E402
from moh.models import create_model  # noqa: E402


def variants(size: str, reference: bool) -> list[tuple[str, str, str]]:
    """(label, preset, backend)."""
    out = [("MHA", f"dit-{size}-mha", "sparse"), ("MHA masked", f"dit-{size}-mha", "masked")]
    for pct in ("90", "75"):
        for backend in ("sparse", "masked") + (("reference",) if reference else ()):
            out.append((f"MoH-{pct} {backend}", f"moh-dit-{size}-{pct}", backend))
    return out


def randomize(model) -> None:
    """Non-zero adaLN modulation (it starts at 0), so routing sees varied inputs, as trained models do."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def step_seconds(model, labels, cfg_scale: float, timed_steps: int) -> float:
    """Seconds per sampling step of a ``timed_steps``-step DDIM run."""
    c = model.cfg
    t0 = time.perf_counter()
    sample_images(model.predict_noise, labels, (c.in_chans, c.image_size, c.image_size), train_scheduler=model.scheduler,
                  null_class=c.num_classes, cfg_scale=cfg_scale, steps=timed_steps, scheduler="ddim",
                  generator=torch.Generator().manual_seed(0))
    return (time.perf_counter() - t0) / timed_steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["s2", "b2"], help="preset sizes (s2 b2 l2 xl2)")
    ap.add_argument("--batch", type=int, default=8, help="images per sampling batch (default 8)")
    ap.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale (default 4: 2B rows per call)")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps the images/s refer to (default 50)")
    ap.add_argument("--timed-steps", type=int, default=2, help="steps per timed run (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median; default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--reference", action="store_true", help="also the per-head reference loop (slow)")
    ap.add_argument("--out", default=None, help="JSON output file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        models = {}
        for label, preset, backend in variants(size, args.reference):
            if preset not in models:
                torch.manual_seed(0)
                models[preset] = create_model(preset).eval()
                randomize(models[preset])
        num_classes = next(iter(models.values())).cfg.num_classes
        labels = torch.randint(0, num_classes, (args.batch,), generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {label: [] for label, _, _ in variants(size, args.reference)}
        with torch.no_grad():
            for rep in range(args.repeats + 1):  # round 0: warm-up
                for label, preset, backend in variants(size, args.reference):
                    set_backend(models[preset], backend)
                    s = step_seconds(models[preset], labels, args.cfg_scale, 1 if rep == 0 else args.timed_steps)
                    if rep:
                        times[label].append(s)
        base = statistics.median(times["MHA"])
        for label, preset, backend in variants(size, args.reference):
            med = statistics.median(times[label])
            atts = models[preset].cfg.attention_configs()
            rows.append(dict(size=size, variant=label, preset=preset, backend=backend, step_s=round(med, 4),
                             step_s_min=round(min(times[label]), 4),
                             images_per_s=round(args.batch / (args.steps * med), 5), speed_vs_mha=round(base / med, 3),
                             heads_used=round(sum(a.active_heads for a in atts) / sum(a.num_heads for a in atts), 4),
                             step_s_all=[round(t, 4) for t in times[label]]))
            r = rows[-1]
            print(f"{size:4s} {label:18s} step {r['step_s']:.3f}s  {r['images_per_s']:.4f} img/s ({args.steps} steps)  "
                  f"x{r['speed_vs_mha']:.2f} vs MHA  heads {r['heads_used']:.3f}", flush=True)
    import subprocess

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=_HERE).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src"], capture_output=True,
                           text=True, cwd=_HERE).stdout.strip()
    meta = dict(commit=head + ("+uncommitted changes in src" if dirty else ""), date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=platform.processor() or platform.machine(),
                threads=args.threads, batch=args.batch, cfg_scale=args.cfg_scale, steps=args.steps,
                timed_steps=args.timed_steps, repeats=args.repeats, torch=torch.__version__, tokens=256,
                latent="32x32x4")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
