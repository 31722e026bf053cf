"""Phase 1: SmolLM2-135M held-out perplexity (lee-test news, 9 x 512 tokens) with every head, the
paper's query_norm at 3 shared + top-4 of 6, random routed heads, a fixed drop of heads 7, 8, and the
oracle (per token the 7 heads with the largest ||head_h(x) W_O^h||), all inside the original
LlamaForCausalLM (heads.py). Run from this folder: python phase1_baselines.py"""
import torch
torch.set_num_threads(2)
from heads import *
m = load_model()
held = windows(tokens("heldout"), 512)
print("heldout windows", held.shape)
res = {}
for name, pol in [("all", None), ("query_norm", qnorm_policy()), ("random", random_policy()),
                  ("fixed_last2", fixed_policy([7, 8])), ("oracle_norm_top7", oracle_norm_policy(7))]:
    r = perplexity(m, held, policy=pol); res[name] = r; print(name, r, flush=True)
