"""Decode speed of converted moh models vs the original LlamaForCausalLM, side by side in one run.

    python benchmarks/convert/decode_speed.py --original .cache/smollm2-135m \
        --moh runs/convert/smollm2-all100 runs/convert/smollm2-cal75 --prompt 256 --new 64 --repeats 5 \
        --out docs/results/convert-decode.json

Greedy ``generate`` (batch 1, KV cache, ``min_new_tokens = max_new_tokens``) from the same prompt
(held-out text). Models are timed in turn, ``repeats`` rounds, so a change in machine load hits
all of them alike; reported: median prefill seconds and median decode tokens/s (new tokens after
the first / time after the prefill), each moh model with the backends asked for.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

import moh  # noqa: F401
from moh.core.attention import set_backend


def prompt_ids(tokens_dir: str, split: str, n: int) -> torch.Tensor:
    from pathlib import Path

    from moh.data.text.tokens import check_token_file, read_meta

    meta = read_meta(tokens_dir)
    path, count = check_token_file(Path(tokens_dir), meta, split)
    ids = np.fromfile(path, dtype=np.dtype(meta["dtype"]).newbyteorder("<"))[:n].astype(np.int64)
    return torch.from_numpy(ids)[None]


class Timer:
    """Prefill time = until the first new token's logits are used (a logits processor call)."""

    def __init__(self):
        self.first = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = time.perf_counter()
        return scores


@torch.no_grad()
def time_one(model, ids, new: int) -> tuple[float, float, torch.Tensor]:
    from transformers import LogitsProcessorList

    timer = Timer()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                         logits_processor=LogitsProcessorList([timer]))
    t1 = time.perf_counter()
    prefill = timer.first - t0
    return prefill, (new - 1) / (t1 - timer.first), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--original", required=True)
    ap.add_argument("--moh", nargs="+", required=True)
    ap.add_argument("--backends", nargs="+", default=["sparse", "masked"])
    ap.add_argument("--tokens", default="data/english/smollm2-tokens")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ids = prompt_ids(a.tokens, "heldout", a.prompt)
    models = {"original " + a.original: AutoModelForCausalLM.from_pretrained(a.original, dtype=torch.float32).eval()}
    for path in a.moh:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for b in a.backends:
            models[f"{path} [{b}]"] = (m, b)
    runs = {k: {"prefill_s": [], "decode_tok_s": []} for k in models}
    outputs = {}
    for name, m in models.items():  # warm-up (and the generated text, compared below)
        model, b = (m, None) if not isinstance(m, tuple) else m
        if b:
            set_backend(model, b)
        outputs[name] = time_one(model, ids, 4)[2]
    for _ in range(a.repeats):
        for name, m in models.items():
            model, b = (m, None) if not isinstance(m, tuple) else m
            if b:
                set_backend(model, b)
            p, d, _ = time_one(model, ids, a.new)
            runs[name]["prefill_s"].append(p)
            runs[name]["decode_tok_s"].append(d)
    base = statistics.median(runs["original " + a.original]["decode_tok_s"])
    rows = []
    for name, r in runs.items():
        m = models[name]
        model = m if not isinstance(m, tuple) else m[0]
        frac = getattr(model.config, "active_fraction", 1.0) if model.config.model_type == "moh" else 1.0
        row = {"model": name, "heads_active": round(frac, 4), "prefill_s": round(statistics.median(r["prefill_s"]), 4),
               "decode_tok_s": round(statistics.median(r["decode_tok_s"]), 2),
               "decode_vs_original": round(statistics.median(r["decode_tok_s"]) / base, 3),
               "decode_tok_s_all": [round(v, 2) for v in r["decode_tok_s"]]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                         f"{a.threads} threads", "prompt_tokens": a.prompt, "new_tokens": a.new,
              "repeats": a.repeats, "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
