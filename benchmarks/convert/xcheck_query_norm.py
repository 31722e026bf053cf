"""Cross-check of the moh query_norm conversion inside the unchanged LlamaForCausalLM (heads.py hooks):
held-out perplexity with every head, query_norm 3 shared + top-4 of 6, and the top-7 contribution oracle.

    OMP_NUM_THREADS=1 python benchmarks/convert/xcheck_query_norm.py
"""
import sys, json; sys.path.insert(0, "benchmarks/convert")
import torch; torch.set_num_threads(1)
from heads import load_model, windows, tokens, perplexity, qnorm_policy, oracle_norm_policy
m = load_model(); held = windows(tokens("heldout"), 512)
for name, pol in [("all", None), ("query_norm_3+4of6", qnorm_policy()), ("oracle_top7_by_contribution", oracle_norm_policy(7))]:
    r = perplexity(m, held, policy=pol); print(json.dumps(dict(policy=name, windows=len(held), **r)), flush=True)
