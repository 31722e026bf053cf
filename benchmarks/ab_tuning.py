"""A/B of SparseTuning variants of the sparse backend on one MoH layer, in one run.

Every variant runs the same layer (same weights, same routing) next to dense SDPA multi-head
attention and the ``ideal`` layer, all timed interleaved (one repeat of each in turn), over the cases
of RESULTS.md section 1 (D=768, 12 heads of 64, batch 1, fp32). A variant is a comma-separated list
of ``field=value`` overrides of the CPU tuning; ``base`` is the tuning as it is.

    python benchmarks/ab_tuning.py --variant chunk_bytes=1 --variant flash_grid=64 \\
        --cases forward:2048:causal,train:2048:causal --threads 1 --clock cpu --repeats 7

Prints ms per candidate and (a) = SDPA ms / ms per case, and each variant's share of the ideal
speedup; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from moh.backends import BACKENDS
from moh.backends.sparse import SparseBackend
from moh.backends.sparse.tuning import CPU, replace
from moh.eval import bench


def parse_variant(spec: str):
    if spec == "base":
        return CPU
    fields = {}
    for item in spec.split(","):
        name, value = item.split("=")
        current = getattr(CPU, name)
        if value.lower() == "none":
            fields[name] = None
        elif current is None:  # an optional field (an integer where set)
            fields[name] = int(value)
        else:
            fields[name] = type(current)(float(value)) if isinstance(current, float) else (
                value.lower() in ("1", "true", "yes") if isinstance(current, bool) else type(current)(value))
    return replace(CPU, **fields)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", action="append", default=[], help="field=value[,field=value...] (repeatable)")
    p.add_argument("--cases", default="forward:2048:causal,forward:2048:bidir",
                   help="kind:N:causal|bidir, comma-separated (kinds: forward, decode, train)")
    p.add_argument("--ratio", type=int, default=50, help="active-head percent")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    p.add_argument("--out", default="results/ab_tuning.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    variants = {"base": CPU}
    for spec in args.variant:
        variants[spec] = parse_variant(spec)
    for name, tuning in variants.items():
        BACKENDS.register(f"sparse_ab_{name}", overwrite=True)(SparseBackend(tuning))
    ratio = args.ratio / 100
    shared, top_k = bench.head_split(12, ratio)
    print(f"threads={torch.get_num_threads()} clock={args.clock} ratio={args.ratio}% load average {os.getloadavg()[0]:.1f}")
    rows = []
    for spec in args.cases.split(","):
        kind, n, mask = spec.split(":")
        n, causal = int(n), mask == "causal"
        torch.manual_seed(0)
        x = torch.randn(1, 1 if kind == "decode" else n, 768, requires_grad=kind == "train")
        ctx = torch.randn(1, n, 768) if kind == "decode" else None
        depth = 4 if kind == "decode" else 1
        calls = {}
        moh_layers = [bench.build_moh(768, 12, 64, ratio, "sparse", causal) for _ in range(depth)]
        for name in variants:
            layers = [bench.build_moh(768, 12, 64, ratio, f"sparse_ab_{name}", causal) for _ in range(depth)]
            for lay, ref in zip(layers, moh_layers):
                lay.load_state_dict(ref.state_dict())
            calls[name], _ = bench._make_call(layers, kind, x, ctx, is_moh=True)
        calls["sdpa"], _ = bench._make_call([bench.DenseMHA(768, 12, 64, causal) for _ in range(depth)], kind, x, ctx,
                                            is_moh=False)
        calls["ideal"], _ = bench._make_call([bench.IdealMHA(768, 12, 64, causal, shared + top_k) for _ in range(depth)],
                                             kind, x, ctx, is_moh=False)
        times = bench.time_interleaved(calls, args.repeats, 1, clock)
        ms = {k: statistics.median(v) / depth for k, v in times.items()}
        ideal = ms["sdpa"] / ms["ideal"]
        print(f"{spec}: sdpa {ms['sdpa']:.2f} ms, ideal {ms['ideal']:.2f} ms ({ideal:.2f}x)")
        for name in variants:
            a = ms["sdpa"] / ms[name]
            print(f"   {name:40s} {ms[name]:9.2f} ms  {a:.2f}x  {a / ideal:5.1%} of ideal")
            rows.append(dict(case=spec, variant=name, ms=ms[name], vs_sdpa=a, of_ideal=a / ideal, all=times[name]))
        rows.append(dict(case=spec, variant="sdpa", ms=ms["sdpa"], all=times["sdpa"]))
        rows.append(dict(case=spec, variant="ideal", ms=ms["ideal"], vs_sdpa=ideal, all=times["ideal"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(threads=args.threads, clock=args.clock, ratio=args.ratio, rows=rows), indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
