"""Where the gap between `sparse` and `ideal` lies: attention or everything around it.

One MoH layer (`sparse`) and the `ideal` layer of `moh bench` (D=768, 12 heads of 64, batch 1),
each timed as it is and with every attention kernel replaced by zeros of the query's shape (the
projections, router, gathers and scatters still run), interleaved in one run:

    python benchmarks/attention_share.py [--n 2048] [--ratio 0.5] [--causal] [--threads 1] [--repeats 9]

attention = full - without attention, per layer. With --threads 1 the clock is the process CPU time.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from moh.backends.sparse import kernels
from moh.eval.bench import IdealMHA, build_moh, head_split, time_interleaved


@contextlib.contextmanager
def no_attention():
    """Every attention kernel of the sparse backend and every SDPA call returns zeros."""
    saved, sdpa = dict(kernels.KERNELS), F.scaled_dot_product_attention
    zeros = lambda job, tuning: torch.zeros_like(job.q)  # noqa: E731
    kernels.KERNELS.update({name: zeros for name in kernels.KERNELS})
    F.scaled_dot_product_attention = lambda q, k, v, **kw: torch.zeros_like(q)
    try:
        yield
    finally:
        kernels.KERNELS.update(saved)
        F.scaled_dot_product_attention = sdpa


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048, help="tokens")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of heads active")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=9)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    D, H, hd = 768, 12, 64
    shared, top_k = head_split(H, a.ratio)
    x = torch.randn(1, a.n, D)
    ideal = IdealMHA(D, H, hd, a.causal, shared + top_k)
    moh = build_moh(D, H, hd, a.ratio, "sparse", a.causal)

    def without(layer):
        def run():
            with no_attention():
                layer(x)
        return run

    calls = {"ideal": lambda: ideal(x), "sparse": lambda: moh(x),
             "ideal without attention": without(ideal), "sparse without attention": without(moh)}
    clock = time.process_time if a.threads == 1 else time.perf_counter
    with torch.no_grad():
        times = time_interleaved(calls, a.repeats, warmup=1, clock=clock)
    ms = {name: statistics.median(ts) for name, ts in times.items()}
    att = {k: ms[k] - ms[f"{k} without attention"] for k in ("ideal", "sparse")}
    mask = "causal" if a.causal else "bidirectional"
    print(f"forward N={a.n} {mask}, {shared + top_k} of {H} heads, threads {a.threads}, median of {a.repeats}")
    for name, v in ms.items():
        print(f"  {name:26s} {v:8.1f} ms")
    print(f"  attention: ideal {att['ideal']:.1f} ms, sparse {att['sparse']:.1f} ms")
    gap = ms["sparse"] - ms["ideal"]
    print(f"  gap sparse - ideal {gap:.1f} ms: attention {att['sparse'] - att['ideal']:.1f}, the rest "
          f"{ms['sparse without attention'] - ms['ideal without attention']:.1f}; "
          f"% of ideal {100 * ms['ideal'] / ms['sparse']:.0f}%")


if __name__ == "__main__":
    main()
