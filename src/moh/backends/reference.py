"""The reference backend: a plain loop over heads, to be read against the paper's equations.

out = sum_h g_h * softmax(q_h k_h^T / sqrt(hd)) v_h W_O^h   (paper Eqs. 1-3)
It computes every head for every token and multiplies by the gate (0 for unused heads), then
applies the output projection to the gated heads side by side (the same sum over h). It projects
its own queries and never reuses a projection the router made (the other backends' reuse is
checked against it). Slow on purpose; every other backend is tested against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moh.backends.base import BACKENDS, AttentionCall, full_mask, masked_softmax


@BACKENDS.register("reference")
def reference_attention(call: AttentionCall) -> Tensor:
    _, _, H = call.shape
    G = call.k.shape[1]
    mask = full_mask(call)  # (B, T, S) or None
    heads = []
    for h in range(H):
        g = h // (H // G)  # the key/value head this query head reads (grouped-query attention)
        q = call.q.heads(h, h + 1, reuse=False)[:, :, 0]  # (B, T, hd)
        scores = q @ call.k[:, g].transpose(-1, -2) * call.scale  # (B, T, S)
        probs = masked_softmax(scores, mask)
        probs = F.dropout(probs, call.dropout_p, training=call.dropout_p > 0)
        heads.append(call.routing.gates_BTH[..., h : h + 1] * (probs @ call.v[:, g]))  # (B, T, hd)
    return call.out.dense(torch.stack(heads, dim=2))  # (B, T, H, hd) -> (B, T, D)
