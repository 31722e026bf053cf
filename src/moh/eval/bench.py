"""``moh bench``: latency and memory of the MoH backends versus dense SDPA multi-head attention.

One attention layer (D, H heads of width hd, batch B; fp32 on the CPU by default, ``--device cuda
--dtype bf16`` on a GPU) is timed for every backend x
active-head ratio, next to a dense baseline: q/k/v/o ``nn.Linear`` + ``F.scaled_dot_product_attention``
with the same D/H (projections included, as in MoH). Candidates of one case (sequence length,
causal or not) are timed *interleaved*, one repeat of each in turn, so machine noise hits all of
them alike; the median is reported. Every row gets two ratios: (a) SDPA time / its time, and
(b) the same backend with every head active / its time. The ``ideal`` rows are dense fused kernels
doing only the work of the active heads (``IdealMHA``): their ratio (a) is the ceiling a head-sparse
backend can reach on this machine. Three kinds of case:

* ``forward``: a forward pass (no autograd) over N tokens, causal and bidirectional;
* ``decode``:  one new token against a KV cache of C tokens (causal), through a stack of
               ``--decode-layers`` layers with a cache each, timed per layer: a single layer's
               4k cache would stay in the 32 MB last-level cache between repeats when only half
               of it is read, which a layer inside a model never sees;
* ``train``:   forward + backward (loss: sum of the output times a fixed random tensor, plus the
               router's load-balance loss for MoH).

Peak memory is the peak of bytes allocated by torch's allocator during one call, above what was
allocated before it (weights, inputs and caches excluded): on the CPU from the profiler's memory
events, on CUDA from ``torch.cuda.max_memory_allocated``. It counts tensors (scores, activations,
autograd buffers), not allocator caching or Python objects. On CUDA every timed call is bracketed by
``torch.cuda.synchronize()`` (wall clock only).

Shape legend: B batch, N tokens, D width, H heads, hd head width.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moh.eval import num_threads

log = logging.getLogger(__name__)

QUICK = dict(dim=96, heads=12, head_dim=8, seq_lens="64,128", decode_contexts="64,256", train_seq_len=128,
             repeats=3, warmup=1)
DEFAULTS = dict(dim=768, heads=12, head_dim=64, seq_lens="512,1024,2048,4096", decode_contexts="1024,4096",
                train_seq_len=2048, repeats=5, warmup=1)


# ---- the layers being compared --------------------------------------------------------------


class DenseMHA(nn.Module):
    """The baseline: multi-head attention with fused SDPA, projections included."""

    def __init__(self, dim: int, heads: int, head_dim: int, causal: bool):
        super().__init__()
        self.h, self.hd, self.causal = heads, head_dim, causal
        self.q, self.k, self.v = (nn.Linear(dim, heads * head_dim, bias=False) for _ in range(3))
        self.o = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x: Tensor, cache=None) -> Tensor:
        """x (B, N, D) -> (B, N, D). With ``cache`` (a KVCache) the new tokens attend to all of it."""
        B, N, _ = x.shape
        q, k, v = (p(x).view(B, N, self.h, self.hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        if cache is not None:
            k, v = cache.update(k, v)
        causal = self.causal and cache is None  # one new token sees the whole cache
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, N, hd)
        return self.o(y.transpose(1, 2).reshape(B, N, -1))


class IdealMHA(DenseMHA):
    """The work a perfect head-sparse kernel has to do, done by the dense fused kernels: keys and
    values of all ``heads`` for every token, but queries, attention and output projection for only
    ``active`` heads (over all tokens). Its speedup over ``DenseMHA`` is the ceiling any MoH backend
    built on these kernels can reach on the machine at that active-head ratio."""

    def __init__(self, dim: int, heads: int, head_dim: int, causal: bool, active: int):
        super().__init__(dim, heads, head_dim, causal)
        self.p = active
        self.q = nn.Linear(dim, active * head_dim, bias=False)
        self.o = nn.Linear(active * head_dim, dim, bias=False)

    def forward(self, x: Tensor, cache=None) -> Tensor:
        B, N, _ = x.shape
        k, v = (p(x).view(B, N, self.h, self.hd).transpose(1, 2) for p in (self.k, self.v))
        if cache is not None:
            k, v = cache.update(k, v)
        q = self.q(x).view(B, N, self.p, self.hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k[:, : self.p], v[:, : self.p], is_causal=self.causal and cache is None)
        return self.o(y.transpose(1, 2).reshape(B, N, -1))


def head_split(heads: int, ratio: float) -> Optional[tuple[int, int]]:
    """(num_shared, top_k) for an active-head ratio; None for 100% (the ``all`` router).
    A sixth of the heads are shared (2 of 12, as in the paper's LLM setting)."""
    if ratio >= 1.0:
        return None
    shared = max(1, round(heads / 6))
    top_k = min(max(round(ratio * heads) - shared, 1), heads - shared)
    return shared, top_k


def build_moh(dim: int, heads: int, head_dim: int, ratio: float, backend: str, causal: bool,
              router: str = "two_stage") -> nn.Module:
    """One MoHAttention layer at an active-head ratio: ``router`` below 100%, ``all`` at 100%."""
    from moh.config import MoHConfig
    from moh.core.attention import MoHAttention

    split = head_split(heads, ratio)
    extra = dict(router="all") if split is None else dict(num_shared=split[0], top_k=split[1], router=router)
    return MoHAttention(MoHConfig(dim=dim, num_heads=heads, head_dim=head_dim, backend=backend, causal=causal, **extra))


# ---- one candidate = a name, a callable, and its layer ----------------------------------------


@dataclass
class Row:
    kind: str  # forward / decode / train
    seq_len: int  # tokens (forward, train) or cache length (decode)
    causal: bool
    backend: str  # "sdpa" for the baseline
    ratio: float  # nominal active-head ratio
    active: float  # measured fraction of (token, head) pairs computed
    ms: float  # median latency
    ms_all: list  # every repeat
    peak_mb: float
    vs_sdpa: float = 0.0  # (a)
    vs_all_heads: float = 0.0  # (b), 0 for the baseline and the 100% rows


def _make_call(layers: list[nn.Module], kind: str, x: Tensor, ctx: Optional[Tensor], is_moh: bool):
    """A zero-argument callable running one case; returns (call, active) where ``active()`` is the
    fraction of (token, head) pairs the last call computed (1.0 for dense layers). ``forward`` and
    ``train`` use ``layers[0]``; ``decode`` steps every layer of the stack, each with its own cache.
    The fraction is read after timing: counting it (a host sync) is no part of a layer's cost."""
    from moh.core.cache import KVCache
    from moh.core.routing import load_balance_loss

    last: list = [None]  # the routing of the last MoH call

    def active() -> float:
        return 1.0 if last[0] is None else last[0].active_fraction()

    def run(layer, inp, cache=None):
        out = layer(inp, cache=cache)
        if is_moh:
            last[0] = out.routing
            return out.output, out.routing
        return out, None

    layer = layers[0]
    if kind == "forward":
        def call():
            with torch.no_grad():
                run(layer, x)
    elif kind == "decode":
        caches = [KVCache(capacity=ctx.shape[1] + 1) for _ in layers]
        with torch.no_grad():
            for lay, cache in zip(layers, caches):
                run(lay, ctx, cache)

        def call():
            with torch.no_grad():
                for lay, cache in zip(layers, caches):
                    run(lay, x, cache)
                    cache.length -= x.shape[1]  # drop the new token: every repeat sees the same context
    else:
        w = torch.randn_like(x)

        def call():
            layer.zero_grad(set_to_none=True)
            y, routing = run(layer, x)
            loss = (y * w).sum()
            if routing is not None:
                loss = loss + 0.01 * load_balance_loss(routing)
            loss.backward()
    return call, active


@contextlib.contextmanager
def _quiet_fd2():
    """The profiler's C++ side writes a line to file descriptor 2 at every start and stop
    (hundreds per run); point fd 2 at /dev/null meanwhile. Exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn: Callable[[], None], device: str = "cpu") -> int:
    """Peak bytes allocated by torch's allocator on ``device`` during ``fn()``, above the level at its start."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(torch.cuda.max_memory_allocated(device) - start, 0)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text())["traceEvents"]
    # the running sum of what the call allocates and frees: the profiler's own "Total Allocated"
    # also counts what earlier profiled calls left alive (another candidate's gradients: +9 to +27 MB
    # on one run's later rows), so it is not a level above this call's start
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    level = peak = 0
    for e in memory:
        level += e["args"].get("Bytes", 0)
        peak = max(peak, level)
    return peak


def _cache_flusher(megabytes: int) -> Optional[Callable[[], None]]:
    """A function writing ``megabytes`` of scratch memory, run before every timed call (untimed) so
    each starts with cold CPU caches. Off by default: it also evicts the code and small tensors that
    a layer inside a model finds warm, which penalises whichever candidate runs more operations
    (decode uses a stack of layers instead, see ``--decode-layers``)."""
    if megabytes <= 0:
        return None
    scratch = torch.empty(megabytes * 2**20 // 4)

    def flush() -> None:
        scratch.fill_(1.0)

    return flush


def time_interleaved(
    calls: dict, repeats: int, warmup: int, clock: Callable[[], float] = time.perf_counter,
    before: Optional[Callable[[], None]] = None,
) -> dict[str, list[float]]:
    """Milliseconds of every repeat; each round runs every candidate once, in a rotating order.
    ``before`` (untimed) runs before every call."""
    names = list(calls)
    for _ in range(warmup):
        for n in names:
            calls[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            if before is not None:
                before()
            t0 = clock()
            calls[n]()
            times[n].append((clock() - t0) * 1e3)
    return times


def run_case(args, kind: str, seq_len: int, causal: bool) -> list[Row]:
    """Time SDPA and every backend x ratio for one (kind, length, causal); fill both ratios."""
    torch.manual_seed(0)
    D, H, hd, B = args.dim, args.heads, args.head_dim, args.batch
    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    n_new = 1 if kind == "decode" else seq_len
    x = torch.randn(B, n_new, D, device=dev, dtype=dtype, requires_grad=(kind == "train"))
    ctx = torch.randn(B, seq_len, D, device=dev, dtype=dtype) if kind == "decode" else None
    makers = {("sdpa", 1.0): lambda: DenseMHA(D, H, hd, causal)}
    for backend in args.backends:
        for ratio in args.ratios:
            makers[(backend, ratio)] = lambda b=backend, r=ratio: build_moh(D, H, hd, r, b, causal, args.router)
    if args.ideal:
        for ratio in args.ratios:
            if ratio < 1.0:
                shared, top_k = head_split(H, ratio)
                makers[("ideal", ratio)] = lambda p=shared + top_k: IdealMHA(D, H, hd, causal, p)
    depth = args.decode_layers if kind == "decode" else 1
    calls, actives = {}, {}
    for key, make in makers.items():
        layers = [make().to(dev, dtype) for _ in range(depth)]
        calls[key], actives[key] = _make_call(layers, kind, x, ctx, is_moh=key[0] not in ("sdpa", "ideal"))
        if key[0] == "ideal":
            actives[key] = lambda p=layers[0].p: p / H
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if dev.type == "cuda":
        def clock(dev=dev):  # the kernels queued so far have finished
            torch.cuda.synchronize(dev)
            return time.perf_counter()
    times = time_interleaved(calls, args.repeats, args.warmup, clock, before=_cache_flusher(args.flush_mb))
    rows = []
    for key, ts in times.items():
        peak = peak_bytes(calls[key], args.device) / 2**20
        ts = [t / depth for t in ts]  # decode: per layer of the stack
        rows.append(Row(kind, seq_len, causal, key[0], key[1], actives[key](), statistics.median(ts),
                        [round(t, 3) for t in ts], round(peak, 2)))
    base = next(r.ms for r in rows if r.backend == "sdpa")
    full = {r.backend: r.ms for r in rows if r.ratio >= 1.0}
    full["ideal"] = base  # the ideal layer with every head active is dense MHA itself
    for r in rows:
        r.vs_sdpa = base / r.ms
        if r.backend != "sdpa" and r.ratio < 1.0 and r.backend in full:
            r.vs_all_heads = full[r.backend] / r.ms
    return rows


# ---- the command ------------------------------------------------------------------------------


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _ints(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {s!r}") from None


def _ratios(s: str) -> list[float]:
    try:
        vals = [float(v) / 100 for v in s.split(",") if v.strip()]  # percents, always (1 is 1%, not 100%)
    except ValueError:
        raise ValueError(f"--ratios expects comma-separated percents like 50,75,100; got {s!r}") from None
    bad = [v for v in vals if not 0 < v <= 1]
    if bad:
        raise ValueError(f"--ratios values must be in (0, 100] percent, got {bad}")
    return sorted(set(vals) | {1.0})  # 100% is always measured: ratio (b) needs it


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dim", type=int, help=f"model width D (default {DEFAULTS['dim']})")
    p.add_argument("--heads", type=int, help=f"attention heads H (default {DEFAULTS['heads']})")
    p.add_argument("--head-dim", type=int, help=f"head width (default {DEFAULTS['head_dim']})")
    p.add_argument("--seq-lens", help=f"forward sequence lengths (default {DEFAULTS['seq_lens']})")
    p.add_argument("--decode-contexts",
                   help=f"KV-cache lengths for the decode step (default {DEFAULTS['decode_contexts']}; '' skips)")
    p.add_argument("--train-seq-len", type=int,
                   help=f"tokens of the training step (default {DEFAULTS['train_seq_len']}; 0 skips)")
    p.add_argument("--ratios", default="50,75,90,100", help="active-head percents (100 = router 'all'; always added)")
    p.add_argument("--backends", default="sparse,masked", help="comma-separated backends (reference is slow)")
    p.add_argument("--repeats", type=int, help=f"timed repeats per candidate (default {DEFAULTS['repeats']})")
    p.add_argument("--warmup", type=int, help=f"untimed runs per candidate (default {DEFAULTS['warmup']})")
    p.add_argument("--batch-size", dest="batch", type=int, default=1, help="sequences per call (default 1)")
    p.add_argument("--batch", dest="batch", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old spelling
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                   help="weights and activations (default fp32; bf16/fp16 accumulate in fp32 inside the kernels)")
    p.add_argument("--router", default="two_stage",
                   help="router below 100%% active: two_stage (learned, the paper's) or query_norm (parameter-free, "
                        "for converted LLMs)")
    p.add_argument("--no-ideal", dest="ideal", action="store_false",
                   help="skip the 'ideal' rows (dense kernels doing only the work of the active heads: the "
                        "ceiling of any head-sparse backend on this machine)")
    p.add_argument("--flush-mb", type=int, default=0,
                   help="MB of scratch memory written (untimed) before every timed call, so it starts with cold "
                        "caches (default 0: off)")
    p.add_argument("--decode-layers", type=int, default=4,
                   help="decode steps through a stack of this many layers, each with its own KV cache, and "
                        "reports the time per layer: the caches then come from memory as in a model, not from "
                        "the last-level cache (default 4)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time; cpu: CPU time of this process (needs --threads 1; not inflated "
                        "by other processes sharing the machine)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, about a minute or less (tests, a first look)")
    p.add_argument("--out", default="results/bench.json", help="JSON file to write")


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the quick or the full defaults and validate them."""
    from moh.backends import BACKENDS

    base = QUICK if args.quick else DEFAULTS
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.seq_lens = _ints(args.seq_lens)
    args.decode_contexts = _ints(args.decode_contexts)
    args.ratios = _ratios(args.ratios)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in args.backends:
        BACKENDS.get(b)  # raises naming the valid backends
    from moh.core.routers import ROUTERS

    ROUTERS.get(args.router)  # raises naming the valid routers
    for name in ("dim", "heads", "head_dim", "repeats", "batch", "decode_layers"):
        if getattr(args, name) <= 0:
            flag = "batch-size" if name == "batch" else name.replace("_", "-")
            raise ValueError(f"--{flag}={getattr(args, name)} must be positive")
    if not args.backends:
        raise ValueError("--backends is empty: name at least one backend (e.g. sparse,masked)")
    if not (args.seq_lens or args.decode_contexts or args.train_seq_len):
        raise ValueError("--seq-lens, --decode-contexts and --train-seq-len are all empty / 0: nothing to measure")
    for r in args.ratios:  # a ratio is measured as a whole number of heads: refuse one it cannot be
        split = head_split(args.heads, r)
        if split is not None and abs(sum(split) / args.heads - r) >= 0.5 / args.heads - 1e-9:
            raise ValueError(f"--ratios {100 * r:g}% cannot be measured with --heads {args.heads}: the nearest "
                             f"split uses {sum(split)} of {args.heads} heads ({100 * sum(split) / args.heads:.1f}%; "
                             f"{max(1, round(args.heads / 6))} shared + at least 1 routed)")
    try:
        dev = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {args.device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device!r}: moh bench times cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r}: torch sees no CUDA device here")
    if dev.type == "cuda" and (args.clock == "cpu" or args.flush_mb):
        raise ValueError("--device cuda times with the wall clock and without --flush-mb "
                         f"(got --clock {args.clock}, --flush-mb {args.flush_mb})")
    if args.clock == "cpu" and args.threads != 1:
        raise ValueError(f"--clock cpu needs --threads 1 (CPU time sums all threads), got --threads {args.threads}")
    lengths = args.seq_lens + args.decode_contexts
    if args.warmup < 0 or args.threads < 0 or args.flush_mb < 0 or args.train_seq_len < 0 or any(n <= 0 for n in lengths):
        raise ValueError(
            f"--warmup={args.warmup}, --threads={args.threads}, --train-seq-len={args.train_seq_len}, "
            f"--flush-mb={args.flush_mb} must be >= 0 "
            f"and the lengths {lengths} > 0"
        )
    return args


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    from moh.kernels import cpu as cpu_kernels

    # whether the sparse backend's CPU runs used moh's C++ kernels or torch's (no compiler, ...)
    kernels = "on" if cpu_kernels.available() else f"off ({cpu_kernels.build_error()})"
    return dict(platform=platform.platform(), cpu=cpu, cpus=os.cpu_count(), threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(), gpu=gpu, moh_cpu_kernels=kernels,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def format_table(rows: list[Row]) -> str:
    head = (f"{'kind':8s} {'N/ctx':>6s} {'mask':6s} {'backend':8s} {'active':>6s} {'ms':>9s} {'peak MB':>8s} "
            f"{'vs SDPA':>8s} {'vs all':>7s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        vs_all = f"{r.vs_all_heads:6.2f}x" if r.vs_all_heads else f"{'-':>7s}"
        lines.append(
            f"{r.kind:8s} {r.seq_len:6d} {'causal' if r.causal else 'bidir':6s} {r.backend:8s} {r.active:6.0%} "
            f"{r.ms:9.2f} {r.peak_mb:8.1f} {r.vs_sdpa:7.2f}x {vs_all}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    args = _resolve(args)
    with num_threads(args.threads):  # callers (tests) keep their own setting
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    info = machine_info()
    print(f"moh bench | {info['date']} | torch {info['torch']} | threads {info['threads']} | {info['cpu']} "
          f"| {info['platform']}")
    where = args.device if args.device == "cpu" else f"{args.device} ({info['gpu']})"
    print(f"D={args.dim} H={args.heads} hd={args.head_dim} B={args.batch} {args.dtype} on {where} | router {args.router} | "
          f"median of {args.repeats} (interleaved), "
          f"{args.warmup} warm-up | {args.clock} clock | decode through {args.decode_layers} layers | "
          f"{f'caches flushed ({args.flush_mb} MB) | ' if args.flush_mb else ''}"
          f"moh CPU kernels {info['moh_cpu_kernels']} | load average {os.getloadavg()[0]:.1f}")
    cases = [("forward", n, c) for n in args.seq_lens for c in (False, True)]
    cases += [("decode", n, True) for n in args.decode_contexts]
    if args.train_seq_len:
        cases += [("train", args.train_seq_len, c) for c in (False, True)]
    rows: list[Row] = []
    for kind, n, causal in cases:
        log.info("bench: %s N=%d %s", kind, n, "causal" if causal else "bidirectional")
        rows += run_case(args, kind, n, causal)
    print(format_table(rows))
    settings = {k: getattr(args, k) for k in ("dim", "heads", "head_dim", "batch", "device", "dtype", "seq_lens", "decode_contexts",
                                              "train_seq_len", "ratios", "backends", "repeats", "warmup", "quick", "clock",
                                              "ideal", "flush_mb", "decode_layers", "router")}
    info["load_average_1min"] = os.getloadavg()[0]  # other processes on the machine distort wall times
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(machine=info, settings=settings, results=[asdict(r) for r in rows]), indent=1))
    print(f"wrote {out}")
    return 0
