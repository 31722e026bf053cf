"""Phase 1: least-squares statistics of log ||c_h|| on [x, q-norms, 1] per layer over N train tokens
(random 512-token windows, seed 1), saved as safetensors. python phase1_calib_stats.py 16384"""
"""Collect per-layer ridge statistics (features -> log ||c_h||) on train text; fit; evaluate policies."""
import torch, sys, time
torch.set_num_threads(2)
from heads import *
m = load_model()
L = len(m.model.layers); H = 9
ntok = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
cal = windows(tokens("train"), 512, n=ntok // 512, seed=1)
F_ = 576 + H + 1
XtX = torch.zeros(L, F_, F_, dtype=torch.float64); XtY = torch.zeros(L, F_, H, dtype=torch.float64)
mean_c = torch.zeros(L, H, dtype=torch.float64); cnt = [0]
def feats(x, q):
    B, T, _ = x.shape
    qn = q.view(B, T, H, 64).norm(dim=-1)
    return torch.cat([x, qn, torch.ones(B, T, 1)], -1).reshape(B * T, -1).double()
def rec(i, x, q, o, g):
    c = g.contributions(i, o).norm(dim=-1).reshape(-1, H).double()
    f = feats(x, q)
    XtX[i] += f.T @ f; XtY[i] += f.T @ c.clamp_min(1e-6).log(); mean_c[i] += c.sum(0)
    if i == 0: cnt[0] += c.shape[0]
t = time.time()
r = perplexity(m, cal, record=rec)
print("calib pass", r, time.time() - t, flush=True)
mean_c /= cnt[0]
from safetensors.torch import save_file
save_file({"XtX": XtX, "XtY": XtY, "mean_c": mean_c, "n": torch.tensor(cnt[0])}, str(MODEL.parent / f"calib_stats_{ntok}.safetensors"))
