"""GPU timings of the sparse backend's Triton kernels against SDPA (flash) doing all heads.

    python benchmarks/gpu/bench_kernels.py --out DIR [--budget-s 240] [--quick]

Cases (bf16, causal, D=2048 = 16 heads of 128, 50% of heads per token, random routing):
* rows attention at N=4096 and 8192: ``rows_attention`` on the rows each head's tokens give
  (forward, forward+backward) vs ``F.scaled_dot_product_attention`` (flash) on all heads, and vs
  SDPA on the same gathered rows with a boolean mask (what torch alone offers);
* decode at a 32k cache, batch 16: ``decode_attention`` with 50% and 100% of heads active vs SDPA
  on all heads; achieved bandwidth from the bytes the active heads must read;
* the per-head projections of gathered rows (issue item 3): index_select + bmm vs Triton
  ``gather_matmul`` vs one dense matmul of all heads; the output side as bmm + index_add_ vs
  scattering the gated head outputs into a dense (T, H*hd) buffer + one dense matmul;
* a small tuning sweep of ``TritonTuning`` for the rows kernels and the decode kernel.

Every timing is the median of CUDA-event-timed repeats after warm-up (first call compiles).
Results are written to DIR/gpu_kernels.json after every section, so a timeout keeps what was
measured; sections beyond ``--budget-s`` seconds are skipped and listed as such.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

T0 = time.time()
RESULTS: dict = {"sections": {}, "skipped": [], "errors": {}}


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def bench(fn, *, warmup: int = 3, repeats: int = 15, min_ms: float = 150.0) -> float:
    """Median milliseconds of ``fn()`` over CUDA-event-timed repeats (more repeats for short fns)."""
    if not torch.cuda.is_available():  # --smoke on CPU: one timed call, wall clock
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    n = max(repeats, min(200, int(min_ms / max(first, 1e-3))))
    times = []
    for _ in range(n):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sdpa_flash(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def routing_rows(B: int, N: int, H: int, frac: float, gen: torch.Generator, device):
    """Random routing: each token uses round(frac * H) heads. Returns rows (B, H, M) ascending token
    indices per head (padding repeats the last used row, as the sparse backend pads), valid (B, H, M)
    and the used-count work fraction of causal attention (sum of qpos + 1 over all heads' full)."""
    k_act = max(1, round(frac * H))
    scores = torch.rand(B, N, H, generator=gen)
    top = scores.topk(k_act, dim=-1).indices
    used = torch.zeros(B, N, H, dtype=torch.bool).scatter_(-1, top, True).transpose(1, 2)  # (B, H, N)
    t = torch.arange(N)
    counts = used.sum(-1)
    M = int(counts.max())
    order = torch.where(used, t, t + N).argsort(-1)[..., :M]
    valid = torch.arange(M) < counts[..., None]
    last = order.gather(-1, (counts - 1).clamp_min(0)[..., None])
    rows = torch.where(valid, order, last)
    work = float(((t + 1) * used).sum()) / (B * H * N * (N + 1) / 2)
    return rows.to(device), valid.to(device), work


def section(name: str, budget_s: float):
    """Decorator: run the section unless over budget; record errors; save JSON after it."""

    def wrap(fn):
        def run(args):
            if time.time() - T0 > budget_s:
                RESULTS["skipped"].append(name)
                log(f"skip {name}: over the {budget_s:.0f} s budget")
                return
            log(f"== {name}")
            try:
                RESULTS["sections"][name] = fn(args)
            except Exception as e:  # noqa: BLE001 - a failing section must not lose the others' numbers
                RESULTS["errors"][name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            save(args)

        run.section_name = name
        return run

    return wrap


def save(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    RESULTS["elapsed_s"] = round(time.time() - T0, 1)
    with open(os.path.join(args.out, "gpu_kernels.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    p.add_argument("--budget-s", type=float, default=240.0, help="skip sections starting after this many seconds")
    p.add_argument("--quick", action="store_true", help="N=4096 only, no sweep")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes on CPU through TRITON_INTERPRET (checks this script, times nothing real)")
    args = p.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: this script times GPU kernels (--smoke checks it on CPU)")
    import triton

    from moh.backends.sparse import triton_kernels as tk

    dev = torch.device("cpu" if args.smoke else "cuda")
    sms = 132 if args.smoke else torch.cuda.get_device_properties(dev).multi_processor_count
    RESULTS["env"] = {
        "gpu": "cpu (smoke)" if args.smoke else torch.cuda.get_device_properties(dev).name, "sms": sms,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    log(f"env {RESULTS['env']}")
    budget = args.budget_s
    B, H, hd, D = 1, 16, 128, 2048
    N_corr, Bd, S_dec = 2048, 16, 32768
    Ns = [4096] if args.quick else [4096, 8192]
    if args.smoke:
        B, H, hd, D, N_corr, Bd, S_dec, Ns = 1, 4, 16, 64, 48, 2, 80, [64]
    dt = torch.bfloat16
    scale = hd**-0.5

    @section("correctness_large", budget)
    def correctness(_):
        """Realistic sizes against fp32 torch: rows (fwd/bwd, deterministic backward) and decode."""
        gen = torch.Generator().manual_seed(0)
        N = N_corr
        rows, valid, _ = routing_rows(1, N, H, 0.5, gen, dev)
        M = rows.shape[-1]
        q = torch.randn(1, H, M, hd, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(1, H, N, hd, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(1, H, N, hd, device=dev, dtype=dt, requires_grad=True)
        kvh = torch.arange(H, device=dev)
        out = tk.rows_attention(q, k, v, rows, kvh, scale=scale, causal=True)
        mask = torch.arange(N, device=dev) <= rows[..., None]  # (1, H, M, N)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale)
        dout = torch.randn_like(out)
        g = torch.autograd.grad(out, (q, k, v), dout)
        g2 = torch.autograd.grad(tk.rows_attention(q, k, v, rows, kvh, scale=scale, causal=True), (q, k, v), dout)
        gr = torch.autograd.grad(ref, (q, k, v), dout.float())
        def rel(a, b):
            a, b = a.detach().float(), b.detach().float()
            return float((a - b).norm() / b.norm())

        res = {"rows_out_rel": rel(out, ref), **{f"rows_d{n}_rel": rel(a, b) for n, a, b in zip("qkv", g, gr)},
               "rows_bwd_deterministic": all(torch.equal(a, b) for a, b in zip(g, g2))}
        Bd4, S = 4, 4 * N_corr
        qd = torch.randn(Bd4, H, hd, device=dev, dtype=dt)
        kc, vc = (torch.randn(Bd4, H, S, hd, device=dev, dtype=dt) for _ in range(2))
        act = torch.rand(Bd4, H, device=dev) > 0.5
        od = tk.decode_attention(qd, kc, vc, act, scale=scale)
        rd = F.scaled_dot_product_attention(qd.float()[:, :, None], kc.float(), vc.float(), scale=scale)[:, :, 0]
        res["decode_rel"] = rel(od, rd * act[..., None])
        res["decode_inactive_zero"] = bool((od[~act] == 0).all())
        worst_grad = max(res[f"rows_d{n}_rel"] for n in "qkv")
        ok = res["rows_out_rel"] < 2e-2 and worst_grad < 5e-2 and res["decode_rel"] < 2e-2
        res["ok"] = bool(ok and res["decode_inactive_zero"])
        log(f"correctness {res}")
        return res

    @section("rows_attention", budget)
    def rows_attention_times(_):
        res = {}
        for N in Ns:
            gen = torch.Generator().manual_seed(N)
            rows, valid, work = routing_rows(B, N, H, 0.5, gen, dev)
            M = rows.shape[-1]
            qf, kf, vf = (torch.randn(B, H, N, hd, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
            qr = torch.randn(B, H, M, hd, device=dev, dtype=dt, requires_grad=True)
            kvh = torch.arange(H, device=dev)
            dfull = torch.randn(B, H, N, hd, device=dev, dtype=dt)
            drows = torch.randn(B, H, M, hd, device=dev, dtype=dt)

            def sdpa_f():
                return sdpa_flash(qf, kf, vf, True)

            def sdpa_fb():
                return torch.autograd.grad(sdpa_flash(qf, kf, vf, True), (qf, kf, vf), dfull)

            def rows_f():
                return tk.rows_attention(qr, kf, vf, rows, kvh, scale=scale, causal=True)

            def rows_fb():
                return torch.autograd.grad(rows_f(), (qr, kf, vf), drows)

            r = {"M": M, "work_fraction": work}
            r["sdpa_flash_all_heads_fwd_ms"] = bench(sdpa_f)
            r["rows_fwd_ms"] = bench(rows_f)
            r["sdpa_flash_all_heads_fwdbwd_ms"] = bench(sdpa_fb)
            r["rows_fwdbwd_ms"] = bench(rows_fb)
            r["speedup_fwd"] = r["sdpa_flash_all_heads_fwd_ms"] / r["rows_fwd_ms"]
            r["speedup_fwdbwd"] = r["sdpa_flash_all_heads_fwdbwd_ms"] / r["rows_fwdbwd_ms"]
            flops_fwd = 4 * work * B * H * N * (N + 1) / 2 * hd
            r["rows_fwd_tflops"] = flops_fwd / r["rows_fwd_ms"] / 1e9
            r["sdpa_fwd_tflops"] = 4 * B * H * N * (N + 1) / 2 * hd / r["sdpa_flash_all_heads_fwd_ms"] / 1e9
            if N <= 4096:  # torch alone on gathered rows: SDPA with a (B, H, M, N) bool mask
                mask = torch.arange(N, device=dev) <= rows[..., None]
                r["sdpa_masked_rows_fwd_ms"] = bench(
                    lambda: F.scaled_dot_product_attention(qr, kf, vf, attn_mask=mask, scale=scale))
                del mask
            log(f"rows N={N}: {r}")
            res[f"N{N}"] = r
            del qf, kf, vf, qr, dfull, drows
        return res

    @section("decode", budget)
    def decode_times(_):
        S = S_dec
        res = {}
        for G in (H, H // 4):
            q = torch.randn(Bd, H, hd, device=dev, dtype=dt)
            kc, vc = (torch.randn(Bd, G, S, hd, device=dev, dtype=dt) for _ in range(2))
            gen = torch.Generator().manual_seed(G)
            act = (torch.rand(Bd, H, generator=gen).argsort(-1) < H // 2).to(dev)  # 50% per token
            full = torch.ones(Bd, H, dtype=torch.bool, device=dev)
            r = {}
            try:  # flash with grouped-query KV (reads each KV head once)
                r["sdpa_flash_all_heads_ms"] = bench(lambda: sdpa_flash(q[:, :, None], kc, vc, False))
            except RuntimeError as e:  # no GQA in this flash build: KV repeated per head (reads more)
                r["sdpa_gqa_error"] = str(e)[:200]
                kr, vr = kc.repeat_interleave(H // G, 1), vc.repeat_interleave(H // G, 1)
                r["sdpa_flash_all_heads_ms"] = bench(lambda: sdpa_flash(q[:, :, None], kr, vr, False))
                del kr, vr
            r["decode_50pct_ms"] = bench(lambda: tk.decode_attention(q, kc, vc, act, scale=scale))
            r["decode_100pct_ms"] = bench(lambda: tk.decode_attention(q, kc, vc, full, scale=scale))
            groups_read = act.view(Bd, G, H // G).any(-1).sum().item()
            bytes_50 = groups_read * S * hd * 2 * 2
            r["decode_50pct_GBps"] = bytes_50 / r["decode_50pct_ms"] / 1e6
            r["decode_100pct_GBps"] = Bd * G * S * hd * 4 / r["decode_100pct_ms"] / 1e6
            r["speedup_50pct"] = r["sdpa_flash_all_heads_ms"] / r["decode_50pct_ms"]
            r["kv_groups_read_fraction"] = groups_read / (Bd * G)
            log(f"decode G={G}: {r}")
            res[f"G{G}"] = r
            del kc, vc
        return res

    @section("projections", budget)
    def projection_times(_):
        """Item 3: is a Triton gathered matmul worth it? N=8192 (4096 with --quick), 50%."""
        N = Ns[-1]
        gen = torch.Generator().manual_seed(1)
        rows, valid, _ = routing_rows(1, N, H, 0.5, gen, dev)
        M = rows.shape[-1]
        x = torch.randn(N, D, device=dev, dtype=dt)
        wq = torch.randn(H, D, hd, device=dev, dtype=dt) / D**0.5
        wq_dense = wq.permute(1, 0, 2).reshape(D, H * hd).contiguous()
        wo = torch.randn(H, hd, D, device=dev, dtype=dt) / hd**0.5
        wo_dense = wo.reshape(H * hd, D).contiguous()
        head = torch.randn(1, H, M, hd, device=dev, dtype=dt)
        gate = valid.to(dt)
        flat = rows.view(-1)
        r = {"M": M}
        r["q_gather_bmm_ms"] = bench(lambda: x.index_select(0, flat).view(1, H, M, D) @ wq)
        r["q_triton_gather_matmul_ms"] = bench(lambda: tk.gather_matmul(x, rows, wq))
        r["q_dense_all_heads_ms"] = bench(lambda: x @ wq_dense)
        xg = x.detach().requires_grad_()
        wg = wq.detach().requires_grad_()
        dy = torch.randn(1, H, M, hd, device=dev, dtype=dt)
        r["q_gather_bmm_fwdbwd_ms"] = bench(
            lambda: torch.autograd.grad(xg.index_select(0, flat).view(1, H, M, D) @ wg, (xg, wg), dy))
        r["q_triton_gather_matmul_fwdbwd_ms"] = bench(
            lambda: torch.autograd.grad(tk.gather_matmul(xg, rows, wg), (xg, wg), dy))

        def out_index_add():
            y = (head * gate[..., None]) @ wo  # (1, H, M, D)
            return torch.zeros(N, D, device=dev, dtype=dt).index_add_(0, flat, y.view(-1, D))

        def out_dense_scatter():
            buf = torch.zeros(N, H, hd, device=dev, dtype=dt)
            hidx = torch.arange(H, device=dev).view(1, H, 1).expand_as(rows)
            buf.index_put_((rows.reshape(-1), hidx.reshape(-1)), (head * gate[..., None]).reshape(-1, hd),
                           accumulate=True)
            return buf.view(N, H * hd) @ wo_dense

        r["o_bmm_index_add_ms"] = bench(out_index_add)
        r["o_scatter_dense_matmul_ms"] = bench(out_dense_scatter)
        ref = x.index_select(0, flat).view(1, H, M, D).float() @ wq.float()
        r["gather_matmul_rel_err"] = float((tk.gather_matmul(x, rows, wq).float() - ref).norm() / ref.norm())
        log(f"projections: {r}")
        return r

    @section("sweep_rows", budget)
    def sweep_rows(_):
        if args.quick:
            return {"skipped": "quick"}
        N = Ns[-1]
        gen = torch.Generator().manual_seed(2)
        rows, _, _ = routing_rows(B, N, H, 0.5, gen, dev)
        M = rows.shape[-1]
        qr = torch.randn(B, H, M, hd, device=dev, dtype=dt, requires_grad=True)
        kf, vf = (torch.randn(B, H, N, hd, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
        kvh = torch.arange(H, device=dev)
        drows = torch.randn_like(qr)
        res = {}
        base = tk.default_tuning(dev, hd, dt)
        configs = [  # forward blocks / warps / stages, dk-dv blocks, dq blocks, backward warps / stages
            dict(block_m=64, block_n=64, num_warps=4, num_stages=3, bwd_block_m=32, bwd_block_n=128,
                 dq_block_m=128, dq_block_n=32, bwd_num_warps=8, bwd_num_stages=2),
            dict(block_m=128, block_n=128, num_warps=8, num_stages=2, bwd_block_m=64, bwd_block_n=64,
                 dq_block_m=64, dq_block_n=64, bwd_num_warps=8, bwd_num_stages=2),
            dict(block_m=128, block_n=32, num_warps=4, num_stages=4, bwd_block_m=16, bwd_block_n=64,
                 dq_block_m=32, dq_block_n=64, bwd_num_warps=4, bwd_num_stages=3),
        ]
        for c in configs:
            if time.time() - T0 > budget:
                res["truncated"] = True
                break
            name = ("f{block_m}x{block_n}w{num_warps}s{num_stages}-kv{bwd_block_m}x{bwd_block_n}"
                    "-dq{dq_block_m}x{dq_block_n}w{bwd_num_warps}s{bwd_num_stages}").format(**c)
            tun = dataclasses.replace(base, **c)
            try:
                f = bench(lambda: tk.rows_attention(qr, kf, vf, rows, kvh, scale=scale, causal=True, tuning=tun))
                fb = bench(lambda: torch.autograd.grad(
                    tk.rows_attention(qr, kf, vf, rows, kvh, scale=scale, causal=True, tuning=tun),
                    (qr, kf, vf), drows))
                res[name] = {"fwd_ms": f, "fwdbwd_ms": fb}
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for one config
                res[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            log(f"sweep {name}: {res[name]}")
        return res

    @section("sweep_decode", budget)
    def sweep_decode(_):
        if args.quick:
            return {"skipped": "quick"}
        S = S_dec
        q = torch.randn(Bd, H, hd, device=dev, dtype=dt)
        kc, vc = (torch.randn(Bd, H, S, hd, device=dev, dtype=dt) for _ in range(2))
        gen = torch.Generator().manual_seed(3)
        act = (torch.rand(Bd, H, generator=gen).argsort(-1) < H // 2).to(dev)
        res = {}
        for bn, warps, progs in [(64, 4, 8), (128, 4, 8), (128, 8, 8), (64, 4, 4), (64, 4, 16)]:
            tun = dataclasses.replace(tk.default_tuning(dev, hd, dt), decode_block_n=bn, decode_num_warps=warps,
                                      decode_programs=progs * sms)
            name = f"n{bn}w{warps}p{progs}xSM"
            try:
                res[name] = bench(lambda: tk.decode_attention(q, kc, vc, act, scale=scale, tuning=tun))
            except Exception as e:  # noqa: BLE001
                res[name] = f"{type(e).__name__}: {e}"[:300]
            log(f"sweep decode {name}: {res[name]}")
        return res

    for fn in (correctness, rows_attention_times, decode_times, projection_times, sweep_rows, sweep_decode):
        fn(args)
    save(args)
    summary(RESULTS)


def summary(res: dict) -> None:
    """A short table last (the tool shows the end of the output)."""
    s = res["sections"]
    print("\n==== summary (ms, median) ====")
    for n, r in s.get("rows_attention", {}).items():
        print(f"rows {n}: fwd {r['rows_fwd_ms']:.3f} vs SDPA {r['sdpa_flash_all_heads_fwd_ms']:.3f} "
              f"({r['speedup_fwd']:.2f}x); fwd+bwd {r['rows_fwdbwd_ms']:.3f} "
              f"vs {r['sdpa_flash_all_heads_fwdbwd_ms']:.3f} "
              f"({r['speedup_fwdbwd']:.2f}x); work {r['work_fraction']:.3f}")
    for n, r in s.get("decode", {}).items():
        print(f"decode {n}: 50% {r['decode_50pct_ms']:.3f} ({r['decode_50pct_GBps']:.0f} GB/s) vs SDPA "
              f"{r['sdpa_flash_all_heads_ms']:.3f} ({r['speedup_50pct']:.2f}x); 100% {r['decode_100pct_ms']:.3f}")
    pr = s.get("projections")
    if pr:
        print("proj: " + ", ".join(f"{k} {v:.3f}" for k, v in pr.items() if k.endswith("_ms")))
    if "correctness_large" in s:
        print(f"correctness ok: {s['correctness_large'].get('ok')}")
    print(f"skipped: {res['skipped']}  errors: {list(res['errors'])}")


if __name__ == "__main__":
    main()
