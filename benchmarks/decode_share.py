"""Where a decode step's time goes: the MoH layer outside its backend, and the backend itself.

One new token of one sequence against a KV cache, through a stack of layers (each with its own
cache, so caches and weights come from memory as in a model), time per layer, interleaved:

    python benchmarks/decode_share.py [--context 1024] [--ratio 0.5] [--layers 4] [--threads 1] [--repeats 30]

candidates: SDPA multi-head attention, `ideal` (the active heads' work with dense kernels), `sparse`
(moh's CPU decode kernels), `sparse` through torch operations (``SparseTuning.cpu_decode=False``),
and the MoH layer with a backend that returns zeros (keys/values, cache, router, query and output
projection objects: what every backend pays before it runs). With --threads 1 the clock is the
process CPU time.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moh.backends.base import BACKENDS
from moh.backends.sparse import SparseBackend
from moh.backends.sparse.tuning import replace, tuning_for
from moh.core.cache import KVCache
from moh.eval.bench import DenseMHA, IdealMHA, build_moh, head_split, time_interleaved


class ZerosBackend:
    """Returns the layer's output shape in zeros: times everything around a backend."""

    def __call__(self, call):
        B, T, _ = call.shape
        return torch.zeros(B, T, call.out.proj.weight.shape[0], dtype=call.q.x.dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=1024, help="cached tokens")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of heads active")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    D, H, hd = 768, 12, 64
    BACKENDS.register("decode_share_zeros", overwrite=True)(ZerosBackend())
    BACKENDS.register("decode_share_torch", overwrite=True)(SparseBackend(replace(tuning_for("cpu"), cpu_decode=False)))
    ctx, x = torch.randn(1, a.context, D), torch.randn(1, 1, D)

    def stack(make):
        layers = [make() for _ in range(a.layers)]
        caches = [KVCache(capacity=a.context + 1) for _ in layers]
        with torch.no_grad():
            for layer, cache in zip(layers, caches):
                layer(ctx, cache=cache)

        def step():
            with torch.no_grad():
                for layer, cache in zip(layers, caches):
                    layer(x, cache=cache)
                    cache.length -= 1  # drop the new token: every repeat sees the same context
        return step

    def moh(backend):
        def make():
            layer = build_moh(D, H, hd, a.ratio, "sparse", causal=True)
            layer.set_backend(backend)
            return layer
        return make

    shared, top_k = head_split(H, a.ratio)
    calls = {
        "sdpa": stack(lambda: DenseMHA(D, H, hd, True)),
        "ideal": stack(lambda: IdealMHA(D, H, hd, True, shared + top_k)),
        "sparse (moh's CPU decode kernels)": stack(moh("sparse")),
        "sparse (torch operations)": stack(moh("decode_share_torch")),
        "MoH layer, backend returning zeros": stack(moh("decode_share_zeros")),
    }
    clock = time.process_time if a.threads == 1 else time.perf_counter
    times = time_interleaved(calls, a.repeats, warmup=3, clock=clock)
    ms = {name: statistics.median(ts) / a.layers for name, ts in times.items()}
    print(f"decode step, {a.context}-token cache, {shared + top_k} of {H} heads, {a.layers} layers, threads "
          f"{a.threads}, median of {a.repeats}, ms per layer")
    for name, v in ms.items():
        print(f"  {name:36s} {v:7.3f} ms  vs SDPA {ms['sdpa'] / v:5.2f}x  % of ideal {100 * ms['ideal'] / v:4.0f}%")


if __name__ == "__main__":
    main()
