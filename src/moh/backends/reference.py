"""The reference backend: a plain loop over heads, to be read against the paper's equations.

out = sum_h g_h * softmax(q_h k_h^T / sqrt(hd)) v_h W_O^h   (paper Eqs. 1-3)
It computes every head for every token and multiplies by the gate (0 for unused heads).
Slow on purpose; every other backend is tested against it.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from moh.backends.base import BACKENDS, AttentionCall, full_mask, masked_softmax


@BACKENDS.register("reference")
def reference_attention(call: AttentionCall) -> Tensor:
    B, T, D = call.x.shape
    H = call.routing.num_heads
    G = call.k.shape[1]
    mask = full_mask(call)  # (B, T, S) or None
    out = call.x.new_zeros(B, T, D)
    for h in range(H):
        g = h // (H // G)  # the key/value head this query head reads (grouped-query attention)
        q = call.attn.project_queries(call.x, slice(h, h + 1), call.positions)[:, :, 0]  # (B,T,hd)
        # (projects its own queries, never reuses call.raw_q: the other backends' reuse is checked against it)
        scores = q @ call.k[:, g].transpose(-1, -2) * call.scale  # (B, T, S)
        probs = masked_softmax(scores, mask)
        probs = F.dropout(probs, call.dropout_p, training=call.dropout_p > 0)
        head = probs @ call.v[:, g]  # (B, T, hd)
        out = out + call.routing.gates_BTH[..., h : h + 1] * (head @ call.attn.out_weight(h).T)
    return out
