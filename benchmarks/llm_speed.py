"""Whole-model speed of MoH language models, side by side in one run (random weights).

    python benchmarks/llm_speed.py [--models llm-s-mha,moh-llm-s-75,moh-llm-s-50] [--prefill 4096]
        [--new-tokens 8] [--decode-rounds 12] [--reps 3] [--threads 2] [--backend sparse]
        [--out results/llm_speed.json] [--quick]

* prefill: one forward of ``--prefill`` tokens (batch 1) that keeps the logits of the last position
  only (``logits_to_keep=1``), building the ``DynamicCache`` as generation does; median seconds.
* decode: ``generate()`` (greedy) of ``--new-tokens`` tokens continuing from a prefill's
  ``DynamicCache`` (so every step attends to at least ``--prefill`` cached positions); tokens/s
  from the time between consecutive steps (a logits processor stamps each one). After each
  round the cache is cropped back to the prefill, so ``--decode-rounds`` short rounds per model
  alternate between the models (a decode step is memory bound: other jobs' use of the memory
  bandwidth moves it, and fine interleaving gives every model the same share of that). The
  models' context is raised to prefill + new tokens for this (random weights: only the limit
  changes).

Models are timed in turn within every repetition and round (the same machine load for all); the
first prefill repetition and the first decode round are warm-ups. ``--clock cpu`` measures the process's CPU time instead of wall time:
on a machine other jobs share, with ``--threads 1``, that is the time the work took, without the
waits for a core (wall-clock ratios there swing with the load). Beside each measured ratio to the first model the script prints the
ceiling an exact implementation could reach: the ratio of multiply-accumulates (prefill) and of
bytes read per decode step (weights + KV cache, float32) of the first model to this one's.
Never a test: numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def macs_per_token(cfg, seq: int) -> float:
    """Multiply-accumulates per prefill token: projections of the active heads (q, o), k and v, the
    MLP, the router, causal attention over ``seq`` keys (mean seq / 2) for the active heads."""
    D, F, hd, G = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_key_value_heads
    total = 0.0
    for a in cfg.attention_configs():
        active = a.active_heads
        router = 0 if a.router == "all" else D * (a.num_heads + 2)  # routed, shared and balance logits
        total += 2 * D * active * hd + 2 * D * G * hd + 3 * D * F + router + 2 * active * hd * seq / 2
    return total


def bytes_per_step(cfg, context: int) -> float:
    """Bytes read per decode step (float32): every weight but the embedding table (q / o only for
    the active heads), plus the KV cache rows of the active heads' key/value groups."""
    D, F, hd, G, V = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_key_value_heads, cfg.vocab_size
    params = V * D  # the LM head
    kv = 0.0
    for a in cfg.attention_configs():
        active = a.active_heads
        params += 2 * D * active * hd + 2 * D * G * hd + 3 * D * F
        groups = G if a.router == "all" else min(G, active)  # a group is read when one of its heads is active
        kv += 2 * groups * hd * context
    return 4.0 * (params + kv)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
now = time.perf_counter  # main() sets the chosen clock


class StepClock:
    """A logits processor that only records when each generation step reaches it."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(now())
        return scores


def prefill(model, ids: torch.Tensor):
    """(seconds, cache, next token) of one forward over ``ids`` keeping the last logits only."""
    from transformers import DynamicCache

    from moh.hf.compat import CACHE_NAME

    cache = DynamicCache(config=model.config)
    t = now()
    out = model(ids, use_cache=True, logits_to_keep=1, **{CACHE_NAME: cache})
    return now() - t, cache, out.logits[:, -1].argmax(-1, keepdim=True)


def decode_tokens_per_s(model, ids: torch.Tensor, cache, token: torch.Tensor, new_tokens: int) -> float:
    """generate() continuing from ``cache`` (which holds ``ids``) with ``token`` next."""
    from transformers import LogitsProcessorList

    from moh.hf.compat import CACHE_NAME

    clock = StepClock()
    full = torch.cat([ids, token], 1)
    model.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=new_tokens, **{CACHE_NAME: cache},
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                   logits_processor=LogitsProcessorList([clock]))
    steps = clock.stamps
    return (len(steps) - 1) / (steps[-1] - steps[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llm-s-mha,moh-llm-s-75,moh-llm-s-50")
    p.add_argument("--prefill", type=int, default=4096, help="prefill tokens = decode context (default 4096)")
    p.add_argument("--new-tokens", type=int, default=8, help="decode steps per round (default 8)")
    p.add_argument("--decode-rounds", type=int, default=12, help="timed decode rounds per model after a warm-up "
                   "(default 12)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions after a warm-up (default 3)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--backend", default="sparse")
    p.add_argument("--clock", default="wall", choices=sorted(CLOCKS), help="wall time (default) or process CPU time")
    p.add_argument("--out", default="results/llm_speed.json")
    p.add_argument("--quick", action="store_true", help="2 layers, 512 tokens, 1 repetition: a smoke run")
    args = p.parse_args(argv)
    import moh  # noqa: F401
    from moh.models import create_model

    global now
    now = CLOCKS[args.clock]
    overrides = dict(backend=args.backend)
    if args.quick:
        args.prefill, args.new_tokens, args.reps, args.decode_rounds = 512, 4, 1, 2
        overrides.update(depth=2, vocab_size=4096)
    overrides["max_position_embeddings"] = args.prefill + args.new_tokens + 1
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    models = {}
    for name in names:
        torch.manual_seed(0)
        models[name] = create_model(name, **overrides).eval()
    V = min(m.config.vocab_size for m in models.values())
    ids = torch.randint(0, V, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    times: dict[str, dict[str, list[float]]] = {n: {"prefill_s": [], "decode_tok_s": []} for n in names}
    caches = {}
    with torch.inference_mode():
        for rep in range(args.reps + 1):
            for name, model in models.items():
                caches.pop(name, None)
                pre, cache, token = prefill(model, ids)
                caches[name] = (cache, token)
                if rep:
                    times[name]["prefill_s"].append(pre)
                print(f"rep {rep}{' (warm-up)' if not rep else ''}  {name:16s} prefill {pre:8.2f} s", flush=True)
        for rnd in range(args.decode_rounds + 1):
            for name, model in models.items():
                cache, token = caches[name]
                dec = decode_tokens_per_s(model, ids, cache, token, args.new_tokens)
                cache.crop(args.prefill - cache.get_seq_length())  # back to the prefill: the same context next round
                if rnd:
                    times[name]["decode_tok_s"].append(dec)
            print(f"round {rnd}{' (warm-up)' if not rnd else ''}  " + "  ".join(
                f"{n} {times[n]['decode_tok_s'][-1]:.2f}" for n in names if rnd) + (" tok/s" if rnd else ""),
                flush=True)
    rows, base = [], names[0]
    for name in names:
        cfg = models[name].config
        row = {"model": name, "heads_active": cfg.active_fraction,
               "params_M": sum(p.numel() for p in models[name].parameters()) / 1e6,
               "prefill_s": statistics.median(times[name]["prefill_s"]),
               "decode_tok_s": statistics.median(times[name]["decode_tok_s"]),
               "prefill_all_s": times[name]["prefill_s"], "decode_all_tok_s": times[name]["decode_tok_s"],
               "macs_per_token": macs_per_token(cfg, args.prefill), "bytes_per_step": bytes_per_step(cfg, args.prefill)}
        rows.append(row)
    b = rows[0]
    print(f"\n{args.prefill}-token prefill (last-position logits) and decode at a {args.prefill}-token context, "
          f"backend {args.backend}, {args.threads} threads, {args.clock} clock; ratios to {base}:")
    print(f"{'model':16s} {'heads':>6s} {'prefill s':>10s} {'speedup':>8s} {'work ceil':>9s} "
          f"{'decode tok/s':>13s} {'speedup':>8s} {'bytes ceil':>10s}")
    for r in rows:
        r["prefill_speedup"] = b["prefill_s"] / r["prefill_s"]
        r["prefill_ceiling"] = b["macs_per_token"] / r["macs_per_token"]
        r["decode_speedup"] = r["decode_tok_s"] / b["decode_tok_s"]
        r["decode_ceiling"] = b["bytes_per_step"] / r["bytes_per_step"]
        print(f"{r['model']:16s} {r['heads_active']:6.0%} {r['prefill_s']:10.2f} {r['prefill_speedup']:7.2f}x "
              f"{r['prefill_ceiling']:8.2f}x {r['decode_tok_s']:13.2f} {r['decode_speedup']:7.2f}x "
              f"{r['decode_ceiling']:9.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"rows": rows, "settings": vars(args), "machine": platform.platform(), "processor": platform.processor(),
           "cpus": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
