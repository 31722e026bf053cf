"""Phase 1: predictor features (key/value-group shared heads, top-4 of 6): x + intercept, x alone
(what two_stage can hold), query norms + intercept. python phase1_features.py STATS x+1,x,qn+1"""
import torch, sys
torch.set_num_threads(2)
from heads import *
from safetensors.torch import load_file
st = load_file(sys.argv[1])
st["n"] = int(st["n"])
L, H = st["mean_c"].shape
def fit(cols, lam=1.0):
    W = []
    for i in range(L):
        A = st["XtX"][i][cols][:, cols].clone(); A.diagonal()[:] += lam * st["n"] / 1e4
        if cols[-1] == 585: A[-1, -1] -= lam * st["n"] / 1e4
        W.append(torch.linalg.solve(A, st["XtY"][i][cols]).float())
    return W
mean_c = st["mean_c"]
grp = [int(mean_c[i].view(3, 3).sum(-1).argmax()) for i in range(L)]
shared = [list(range(3 * g, 3 * g + 3)) for g in grp]
X = list(range(576)); Q = list(range(576, 585)); ONE = [585]
variants = {"x+1": X + ONE, "x": X, "qn+1": Q + ONE, "x+qn+1": X + Q + ONE}
which = sys.argv[2].split(",")
m = load_model()
held = windows(tokens("heldout"), 512)
for name in which:
    cols = variants[name]; W = fit(cols)
    def pol(i, x, q, o, g, W=W, cols=cols):
        B, T, _ = x.shape
        qn = q.view(B, T, H, 64).norm(dim=-1)
        f = torch.cat([x, qn, torch.ones(B, T, 1)], -1)[..., cols]
        return topk_gates(f @ W[i], 4, shared[i])
    r = perplexity(m, held, policy=pol); print(name, r, flush=True)
