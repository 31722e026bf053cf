"""Phase 1: policies from the statistics (phase1_calib_stats.py): the fitted predictor with no shared
heads (top 7 of 9), with shared heads by mean contribution or by key/value group, the oracle with
those shared heads, a per-layer static drop of the 2 smallest mean contributions, random routed
heads with calibrated shared heads. python phase1_policies.py ../../.cache/calib_stats_16384.safetensors 1.0"""
import torch, sys
torch.set_num_threads(2)
from heads import *
from safetensors.torch import load_file
st = load_file(sys.argv[1])
st["n"] = int(st["n"])
lam = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
which = sys.argv[3].split(",") if len(sys.argv) > 3 else None
L, H = st["mean_c"].shape
W = []
for i in range(L):
    A = st["XtX"][i].clone(); A.diagonal()[:-1] += lam * st["n"] / 1e4
    W.append(torch.linalg.solve(A, st["XtY"][i]).float())
mean_c = st["mean_c"]
shared_mean = [mean_c[i].topk(3).indices.tolist() for i in range(L)]
grp = [int(mean_c[i].view(3, 3).sum(-1).argmax()) for i in range(L)]
shared_gqa = [list(range(3 * g, 3 * g + 3)) for g in grp]
static_drop = [mean_c[i].topk(2, largest=False).indices.tolist() for i in range(L)]
print("shared(mean)", shared_mean, "\nshared(gqa)", shared_gqa, "\nstatic drop", static_drop, flush=True)
def pred_policy(K_total=7, shared=None, K=None):
    def pol(i, x, q, o, g):
        B, T, _ = x.shape
        qn = q.view(B, T, H, 64).norm(dim=-1)
        f = torch.cat([x, qn, torch.ones(B, T, 1)], -1)
        s = f @ W[i]
        return topk_gates(s, K_total) if shared is None else topk_gates(s, K, shared[i])
    return pol
m = load_model()
held = windows(tokens("heldout"), 512)
pols = {"pred_top7": pred_policy(7), "pred_sharedmean_top4": pred_policy(shared=shared_mean, K=4),
        "pred_sharedgqa_top4": pred_policy(shared=shared_gqa, K=4),
        "oracle_sharedmean_top4": oracle_norm_policy(shared=shared_mean, K=4),
        "oracle_sharedgqa_top4": oracle_norm_policy(shared=shared_gqa, K=4),
        "static_drop2": fixed_policy(static_drop), "random_sharedmean": random_policy(K=4, shared=shared_mean)}
for name, pol in pols.items():
    if which and name not in which: continue
    r = perplexity(m, held, policy=pol); print(name, lam, r, flush=True)
