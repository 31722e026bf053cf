"""Micro-benchmark of the pieces the sparse backend is built from, side by side, to show where
the time of one MoH layer goes and why the backend is built the way it is.

    python benchmarks/kernel_rates.py [--n 2048] [--rows 840] [--threads 1] [--flex]

With --threads 1 it reports process CPU time (robust when other jobs share the machine);
otherwise wall time. Every line is the median of interleaved repeats; ratios are relative to
the first line of their group. See ``moh bench`` for the end-to-end layer comparison.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moh.kernels import cpu as cpu_kernels
from moh.kernels.cpu import rows_attention
from moh.backends.sparse.kernels import causal_flash


def timed(groups: dict[str, dict], repeats: int, clock) -> None:
    for title, fns in groups.items():
        for f in fns.values():
            f()
        ts: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):
            for k, f in fns.items():
                t0 = clock()
                f()
                ts[k].append((clock() - t0) * 1e3)
        med = {k: statistics.median(v) for k, v in ts.items()}
        first = next(iter(med.values()))
        print(f"\n{title}")
        for k, v in med.items():
            print(f"  {k:44s} {v:9.2f} ms  {first / v:5.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048, help="tokens (keys)")
    p.add_argument("--rows", type=int, default=840, help="tokens using one routed head (50%%: ~0.41 n)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--flex", action="store_true",
                   help="also torch.compile'd flex_attention with a block mask of the rows' horizons (compiles ~10 s)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    clock = time.process_time if a.threads == 1 else time.perf_counter
    torch.manual_seed(0)
    N, M, D, hd = a.n, a.rows, a.dim, a.head_dim
    x, w = torch.randn(N, D), torch.randn(D, D) / D**0.5
    idx = torch.randperm(N)[:M].sort().values
    q, k, v = (torch.randn(1, 1, N, hd) for _ in range(3))
    qr = q[:, :, :M]
    neg = torch.finfo(torch.float32).min

    def own_causal(rb: int):
        outs = []
        for s in range(0, M, rb):
            e = min(s + rb, M)
            kd, ke = int(idx[s]) + 1, int(idx[e - 1]) + 1
            sc = qr[:, :, s:e] @ k[:, :, :ke].transpose(-1, -2)
            sc[..., kd:ke].masked_fill_(torch.arange(kd, ke) > idx[s:e, None], neg)
            outs.append(torch.softmax(sc, -1) @ v[:, :, :ke])
        return torch.cat(outs, 2)

    def sdpa_masked(rb: int):
        outs = []
        for s in range(0, M, rb):
            e = min(s + rb, M)
            ke = int(idx[e - 1]) + 1
            allowed = torch.arange(ke) <= idx[s:e, None]
            outs.append(F.scaled_dot_product_attention(qr[:, :, s:e], k[:, :, :ke], v[:, :, :ke], attn_mask=allowed))
        return torch.cat(outs, 2)

    groups = {
        f"projections: dense (all {N} rows) vs one head's {M} rows": {
            "dense D x D (one of q/k/v/o)": lambda: x @ w.T,
            "one head, gathered rows: q": lambda: x.index_select(0, idx) @ w[:hd].T,
            "one head, gathered rows: o (+ index_add)": lambda: torch.zeros(N, D).index_add_(0, idx, qr[0, 0] @ w[:, :hd].T),
        },
        f"attention, one head: all {N} rows vs {M} gathered rows": {
            "SDPA all rows, bidirectional": lambda: F.scaled_dot_product_attention(q, k, v),
            "SDPA all rows, causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "SDPA gathered rows, bidirectional": lambda: F.scaled_dot_product_attention(qr, k, v),
            "gathered causal: flash rows, grid 128 (torch's kernels)": lambda: causal_flash(qr, k, v, idx[None, None], hd**-0.5, 128, 64),
            "gathered causal: own blocks of 128 (with padding)": lambda: own_causal(128),
            **({"gathered causal: moh's rows kernel (sparse, used)": lambda: rows_attention(qr, k, v, idx[None, None], hd**-0.5)}
               if cpu_kernels.available() else {}),
            "gathered causal: own blocks of 64": lambda: own_causal(64),
            "gathered causal: SDPA + bool mask, blocks 256": lambda: sdpa_masked(256),
        },
    }
    if a.flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        horizon = idx[None, None]  # (1, 1, M) key index of every gathered row
        block_mask = create_block_mask(lambda b, h, qi, ki: ki <= horizon[b, h, qi], 1, 1, M, N, device="cpu")
        flex = torch.compile(flex_attention)
        groups[f"attention, one head: all {N} rows vs {M} gathered rows"]["gathered causal: compiled flex_attention"] = \
            lambda: flex(qr, k, v, block_mask=block_mask, scale=hd**-0.5)
    with torch.no_grad():
        timed(groups, a.repeats, clock)
        rates(N, D, hd, a.repeats, clock)


def rates(N: int, D: int, hd: int, repeats: int, clock) -> None:
    """GFLOP/s of a D x D projection and of SDPA over D // hd heads: how close the dense baseline
    already runs to the machine's matmul rate (the ceiling argument in RESULTS.md section 1)."""
    H = D // hd
    x, w = torch.randn(N, D), torch.randn(D, D)
    q, k, v = (torch.randn(1, H, N, hd) for _ in range(3))
    cases = {
        f"matmul {N}x{D}x{D}": (lambda: x @ w, 2 * N * D * D),
        f"SDPA {H} heads, bidirectional": (lambda: F.scaled_dot_product_attention(q, k, v), 4 * N * N * hd * H),
        f"SDPA {H} heads, causal (counting half)": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                                   2 * N * N * hd * H),
    }
    print("\nrates")
    for name, (fn, flops) in cases.items():
        fn()
        ts = []
        for _ in range(repeats):
            t0 = clock()
            fn()
            ts.append(clock() - t0)
        sec = statistics.median(ts)
        print(f"  {name:44s} {sec * 1e3:9.2f} ms  {flops / sec / 1e9:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
