"""The masked backend: compute every head with fused SDPA, then weight by the gates (zeroing
unused heads) before one dense output projection. This is what the authors' released code does:
it saves no time, and is kept to compare against."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moh.backends.base import BACKENDS, AttentionCall, full_mask


@BACKENDS.register("masked")
def masked_attention(call: AttentionCall) -> Tensor:
    _, T, H = call.shape
    G = call.k.shape[1]
    q = call.q.heads(0, H).transpose(1, 2)  # (B, H, T, hd)
    k, v = call.k, call.v
    if G != H:
        k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
    mask = full_mask(call)
    bias = None
    if mask is not None:  # additive, with the dtype's minimum, to match the other backends exactly
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~mask, torch.finfo(q.dtype).min)
        bias = bias[:, None]
    heads = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=call.dropout_p, scale=call.scale
    )  # (B, H, T, hd)
    gates = call.routing.gates_BTH
    if mask is not None:  # rows that see no key output 0 (see masked_softmax)
        gates = gates * mask.any(-1, keepdim=True).to(gates.dtype)
    heads = heads * gates.transpose(1, 2).unsqueeze(-1).to(heads.dtype)
    return call.out.dense(heads.transpose(1, 2))
