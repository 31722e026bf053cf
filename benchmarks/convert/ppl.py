"""Perplexity of model directories (any AutoModelForCausalLM, moh ones included) on token splits.

    python benchmarks/convert/ppl.py MODEL_DIR [MODEL_DIR ...] --tokens .cache/data/smollm2-tokens \
        --split heldout --seq 512 [--windows N] [--backend sparse]

Windows: non-overlapping seq-token windows from the start of the split (the last partial one
dropped); perplexity = exp(mean next-token NLL over every predicted position). JSON lines out.
"""
import argparse, json, math, time
import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
import moh  # noqa: F401
from moh.core.attention import set_backend
from moh.data.text.tokens import check_token_file, read_meta


def windows(root, split, seq, n=None):
    meta = read_meta(root)
    path, count = check_token_file(__import__("pathlib").Path(root), meta, split)
    ids = np.fromfile(path, dtype=np.dtype(meta["dtype"]).newbyteorder("<")).astype(np.int64)
    k = len(ids) // seq
    w = torch.from_numpy(ids[: k * seq].reshape(k, seq))
    return w if n is None else w[:n]


@torch.no_grad()
def ppl(model, win, batch=4):
    nll, n, heads = 0.0, 0, []
    for s in range(0, len(win), batch):
        x = win[s:s + batch]
        out = model(input_ids=x, use_cache=False)
        lg = out.logits
        nll += F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="sum").item()
        n += x[:, 1:].numel()
        r = getattr(out, "routings", None)
        if r:
            heads.append(torch.stack([ri.active_BTH.float().sum(-1).mean() for ri in r]))
    per_layer = torch.stack(heads).mean(0).tolist() if heads else None
    return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n, "heads_active_per_layer": per_layer}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--tokens", default=".cache/data/smollm2-tokens")
    ap.add_argument("--split", default="heldout")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--backend", default="sparse")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    win = windows(a.tokens, a.split, a.seq, a.windows)
    for m in a.models:
        model = AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32).eval()
        if getattr(model.config, "model_type", "") == "moh":
            set_backend(model, a.backend)
        t = time.time()
        r = ppl(model, win)
        r.update(model=m, split=a.split, seq=a.seq, windows=len(win), seconds=round(time.time() - t, 1))
        if r["heads_active_per_layer"]:
            r["heads_active_mean"] = sum(r["heads_active_per_layer"]) / len(r["heads_active_per_layer"])
            r["heads_active_per_layer"] = [round(v, 3) for v in r["heads_active_per_layer"]]
        print(json.dumps(r), flush=True)
