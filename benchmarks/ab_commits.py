"""A/B latency of one MoH layer: this checkout against an earlier commit, side by side in one run.

The earlier commit's ``src/moh`` is extracted with ``git archive`` into a temporary directory as
package ``moh_old`` (imports rewritten), so both versions live in one process. Both layers get the
same weights (parameter names are the same) and are timed interleaved, one repeat of each in
turn, over the cases of RESULTS.md section 1 (D=768, 12 heads of 64, batch 1, fp32; or --batch-size,
--dim, --heads, --head-dim).

    python benchmarks/ab_commits.py --old 507dd04 [--backend sparse] [--threads 2] [--repeats 7]

Prints old ms, new ms and old/new (> 1: the new code is faster) per case, and writes JSON.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CASES = [("forward", 2048, False), ("forward", 2048, True), ("forward", 4096, True), ("decode", 4096, True),
         ("train", 2048, False), ("train", 2048, True)]


def extract_old(commit: str, into: Path) -> None:
    """``src/moh`` of ``commit`` as package ``moh_old`` under ``into``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src/moh"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "src" / "moh").rename(into / "moh_old")
    for path in (into / "moh_old").rglob("*.py"):
        text = path.read_text()
        text = re.sub(r"\bfrom moh\b", "from moh_old", text)
        text = re.sub(r"\bimport moh\b", "import moh_old", text)
        text = re.sub(r'"moh\.([a-z_.]+)"', r'"moh_old.\1"', text)
        path.write_text(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, help="the earlier commit (any git revision)")
    p.add_argument("--backend", default="sparse")
    p.add_argument("--ratios", default="50,75")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time (steadier on a shared machine, with --threads 1)")
    p.add_argument("--cases", default="",
                   help="comma-separated subset of the cases as kind:N:causal|bidir, e.g. forward:2048:causal,decode:4096:causal "
                        "(default: all)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--out", default="results/ab_commits.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="moh_old_"))
    extract_old(args.old, tmp)
    sys.path.insert(0, str(tmp))
    old_bench = importlib.import_module("moh_old.eval.bench")
    from moh.eval import bench as new_bench

    rows = []
    print(f"old={args.old} new=working tree  backend={args.backend}  threads={torch.get_num_threads()}  "
          f"clock={args.clock}  load average {os.getloadavg()[0]:.2f}")
    print(f"{'case':28s} {'active':>6s} {'old ms':>9s} {'new ms':>9s} {'old/new':>8s}")
    cases = CASES
    if args.cases:
        cases = [(k, int(n), c == "causal") for k, n, c in (spec.split(":") for spec in args.cases.split(","))]
    for kind, n, causal in cases:
        for ratio in [int(r) / 100 for r in args.ratios.split(",")]:
            torch.manual_seed(0)
            B, D, H, hd = args.batch_size, args.dim, args.heads, args.head_dim
            x = torch.randn(B, 1 if kind == "decode" else n, D, requires_grad=kind == "train")
            ctx = torch.randn(B, n, D) if kind == "decode" else None
            depth = 4 if kind == "decode" else 1
            calls = {}
            new_layers = [new_bench.build_moh(D, H, hd, ratio, args.backend, causal) for _ in range(depth)]
            old_layers = [old_bench.build_moh(D, H, hd, ratio, args.backend, causal) for _ in range(depth)]
            for o, nl in zip(old_layers, new_layers):
                o.load_state_dict(nl.state_dict())
            calls["old"], _ = new_bench._make_call(old_layers, kind, x, ctx, is_moh=True)
            calls["new"], _ = new_bench._make_call(new_layers, kind, x, ctx, is_moh=True)
            clock = time.process_time if args.clock == "cpu" else time.perf_counter
            times = new_bench.time_interleaved(calls, args.repeats, 1, clock)
            old_ms, new_ms = (statistics.median(times[k]) / depth for k in ("old", "new"))
            name = f"{kind} N={n} {'causal' if causal else 'bidir'}"
            print(f"{name:28s} {ratio:6.0%} {old_ms:9.2f} {new_ms:9.2f} {old_ms / new_ms:8.2f}x")
            rows.append(dict(kind=kind, n=n, causal=causal, ratio=ratio, old_ms=old_ms, new_ms=new_ms,
                             old_over_new=old_ms / new_ms, old_all=times["old"], new_all=times["new"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(old=args.old, backend=args.backend, threads=torch.get_num_threads(), clock=args.clock,
                                   batch_size=args.batch_size, dim=args.dim, heads=args.heads, head_dim=args.head_dim,
                                   rows=rows),
                              indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
