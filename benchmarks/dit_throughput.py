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

``--clock cpu`` times the process's CPU time instead of wall time: on a machine other jobs share,
with ``--threads 1``, that is the time the work took, without the waits for a core. Each row also
has ``attn_share``: the part of the step's time spent inside the MoHAttention layers (projections,
router and attention; forward hooks, same clock), and ``work_ceiling``: the ratio of
multiply-accumulates per step of MHA to this variant's (``macs_per_image``), the speed-up an exact
implementation of the skipped heads could reach. Never a test: numbers depend on the machine.

    python benchmarks/dit_throughput.py --sizes s2 b2 --batch 8 --threads 2 --out results/dit_throughput.json
    python benchmarks/dit_throughput.py --threads 1 --clock cpu --out results/dit_throughput.json
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

from moh.core.attention import MoHAttention, set_backend  # noqa: E402
from moh.diffusion import sample_images  # noqa: E402
from moh.models import create_model  # noqa: E402


def variants(size: str, reference: bool) -> list[tuple[str, str, str]]:
    """(label, preset, backend)."""
    out = [("MHA", f"dit-{size}-mha", "sparse"), ("MHA masked", f"dit-{size}-mha", "masked")]
    for pct in ("90", "75"):
        for backend in ("sparse", "masked") + (("reference",) if reference else ()):
            out.append((f"MoH-{pct} {backend}", f"moh-dit-{size}-{pct}", backend))
    return out


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
now = time.perf_counter  # main() sets the chosen clock


class AttentionTimer:
    """Forward hooks on every MoHAttention: the seconds (``now`` clock) spent inside them."""

    def __init__(self, model) -> None:
        self.total, self._t0 = 0.0, 0.0
        for m in model.modules():
            if isinstance(m, MoHAttention):
                m.register_forward_pre_hook(self._pre)
                m.register_forward_hook(self._post)

    def _pre(self, module, args) -> None:
        self._t0 = now()

    def _post(self, module, args, output) -> None:
        self.total += now() - self._t0


def macs_per_image(cfg) -> float:
    """Multiply-accumulates of one denoiser forward of one image: per token the patch embedding, the
    q / o projections of the active heads, k and v of all heads, the router, attention over all T
    tokens for the active heads (scores and values), the MLP and the final layer; per image the
    adaLN modulations (6 D x D per block, 2 D x D final) and the timestep / label embeddings."""
    D, T, p, C = cfg.dim, (cfg.image_size // cfg.patch_size) ** 2, cfg.patch_size, cfg.in_chans
    F = int(D * cfg.mlp_ratio)
    per_token = p * p * C * D + D * p * p * C  # patch embedding, final linear
    per_image = 2 * D * D + 256 * D + D * D  # final modulation, timestep MLP (256 frequencies)
    for a in cfg.attention_configs():
        hd, H, S = a.head_dim, a.num_heads, a.num_shared
        active = H if a.router == "all" else a.active_heads
        E = H - S
        router = 0 if a.router == "all" else D * (E + (S if S > 1 else 0) + (2 if S and E else 0))
        per_token += 2 * D * active * hd + 2 * D * H * hd + router + 2 * active * hd * T + 2 * D * F
        per_image += 6 * D * D
    return T * per_token + per_image


def attention_macs_per_image(cfg) -> float:
    """The part of ``macs_per_image`` in the attention layers (projections, router, attention)."""
    D, T = cfg.dim, (cfg.image_size // cfg.patch_size) ** 2
    total = 0.0
    for a in cfg.attention_configs():
        hd, H, S = a.head_dim, a.num_heads, a.num_shared
        active = H if a.router == "all" else a.active_heads
        E = H - S
        router = 0 if a.router == "all" else D * (E + (S if S > 1 else 0) + (2 if S and E else 0))
        total += T * (2 * D * active * hd + 2 * D * H * hd + router + 2 * active * hd * T)
    return total


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
    t0 = now()
    sample_images(model.predict_noise, labels, (c.in_chans, c.image_size, c.image_size), train_scheduler=model.scheduler,
                  null_class=c.num_classes, cfg_scale=cfg_scale, steps=timed_steps, scheduler="ddim",
                  generator=torch.Generator().manual_seed(0))
    return (now() - t0) / timed_steps


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
    ap.add_argument("--clock", default="wall", choices=sorted(CLOCKS), help="wall time (default) or process CPU time")
    ap.add_argument("--out", default=None, help="JSON output file")
    args = ap.parse_args()
    global now
    now = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        models, timers = {}, {}
        for label, preset, backend in variants(size, args.reference):
            if preset not in models:
                torch.manual_seed(0)
                models[preset] = create_model(preset).eval()
                randomize(models[preset])
                timers[preset] = AttentionTimer(models[preset])
        num_classes = next(iter(models.values())).cfg.num_classes
        labels = torch.randint(0, num_classes, (args.batch,), generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {label: [] for label, _, _ in variants(size, args.reference)}
        attn: dict[str, list[float]] = {label: [] for label, _, _ in variants(size, args.reference)}
        with torch.no_grad():
            for rep in range(args.repeats + 1):  # round 0: warm-up
                for label, preset, backend in variants(size, args.reference):
                    set_backend(models[preset], backend)
                    timers[preset].total = 0.0
                    s = step_seconds(models[preset], labels, args.cfg_scale, 1 if rep == 0 else args.timed_steps)
                    if rep:
                        times[label].append(s)
                        attn[label].append(timers[preset].total / args.timed_steps / s)
        base = statistics.median(times["MHA"])
        base_macs = macs_per_image(models[variants(size, args.reference)[0][1]].cfg)
        for label, preset, backend in variants(size, args.reference):
            med = statistics.median(times[label])
            atts = models[preset].cfg.attention_configs()
            rows.append(dict(size=size, variant=label, preset=preset, backend=backend, step_s=round(med, 4),
                             step_s_min=round(min(times[label]), 4),
                             images_per_s=round(args.batch / (args.steps * med), 5), speed_vs_mha=round(base / med, 3),
                             speed_vs_mha_min=round(min(times["MHA"]) / min(times[label]), 3),
                             heads_used=round(sum(a.active_heads for a in atts) / sum(a.num_heads for a in atts), 4),
                             macs_per_image=macs_per_image(models[preset].cfg),
                             work_ceiling=round(base_macs / macs_per_image(models[preset].cfg), 3),
                             attn_macs_share=round(attention_macs_per_image(models[preset].cfg)
                                                   / macs_per_image(models[preset].cfg), 4),
                             attn_share=round(statistics.median(attn[label]), 4),
                             step_s_all=[round(t, 4) for t in times[label]]))
            r = rows[-1]
            print(f"{size:4s} {label:18s} step {r['step_s']:.3f}s (min {r['step_s_min']:.3f})  "
                  f"{r['images_per_s']:.4f} img/s ({args.steps} steps)  x{r['speed_vs_mha']:.2f} vs MHA "
                  f"(min x{r['speed_vs_mha_min']:.2f}, ceiling x{r['work_ceiling']:.2f})  heads {r['heads_used']:.3f}  "
                  f"attention {r['attn_share']:.1%} of the time, {r['attn_macs_share']:.1%} of the MACs", flush=True)
    import subprocess

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=_HERE).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src"], capture_output=True,
                           text=True, cwd=_HERE).stdout.strip()
    meta = dict(commit=head + ("+uncommitted changes in src" if dirty else ""), date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=platform.processor() or platform.machine(),
                threads=args.threads, clock=args.clock, batch=args.batch, cfg_scale=args.cfg_scale, steps=args.steps,
                timed_steps=args.timed_steps, repeats=args.repeats, torch=torch.__version__, tokens=256,
                latent="32x32x4")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
