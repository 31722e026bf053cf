"""The sparse backend: work only for the (token, head) pairs the router selected.

After one look at the routing (a host sync, once per layer) a ``Plan`` splits the heads:

* *full* heads, used by (nearly) every token: contiguous runs of them are computed together with
  no gather, reading keys, values and weights as views (no copies, also of the KV cache);
* *partial* heads, used by some tokens: a few at a time, the rows that use each head are gathered
  (padded to the largest count, padding gated to 0), only those queries are projected, attend
  over the keys/values of all positions, are weighted by the gate and projected with W_O^h (only
  those rows) into the output. Heads no token uses cost nothing.

Keys/values are computed for every token by the caller. Which attention kernel runs is one
function of device, dtype, mask kind, rows and keys (``kernels.choose_kernel``); its constants
are a per-device ``SparseTuning``. A fixed number of large operations per layer (not a loop over
heads) keeps the Python and thread-synchronisation overhead small.

Shape legend: B batch, T queries, S key positions, D width, H heads, P heads in a group,
M rows per head, hd head width.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moh.backends.base import BACKENDS, AttentionCall
from moh.backends.sparse.kernels import Attend, attend, triton_available
from moh.backends.sparse.plan import make_plan
from moh.backends.sparse.rows import gather_rows, row_gates, rows_mask
from moh.backends.sparse.tuning import SparseTuning, tuning_for


class SparseBackend:
    """``SparseBackend(tuning=None, device=None)(call)``. ``tuning``: fixed constants (default:
    ``tuning_for`` the tensors' device); ``device``: the device kind the kernel choice assumes
    (default: the tensors'), e.g. "cuda" on CPU tensors to run the portable kernels in tests."""

    def __init__(self, tuning: Optional[SparseTuning] = None, device: Optional[str] = None):
        self.tuning, self.device = tuning, device

    def __call__(self, call: AttentionCall) -> Tensor:
        device = self.device or call.k.device.type
        tuning = self.tuning or tuning_for(device)
        B, T, H = call.shape
        if T == 1 and device == "cuda" and tuning.triton and call.dropout_p == 0 and triton_available():
            return _decode_step(call, tuning)
        counts = call.routing.active_BTH.sum(1).tolist()  # (B, H) tokens per item and head
        plan = make_plan(counts, T=T, S=call.k.shape[2], D=call.q.x.shape[-1], causal=call.causal,
                         element_size=call.q.x.element_size(), threads=torch.get_num_threads(), tuning=tuning)
        acc = call.out.start(B, T)
        for h0, h1 in plan.full:
            acc.add_heads(h0, h1, _full_run(call, h0, h1, device, tuning))
        for heads, M in plan.partial:
            rows = gather_rows(call.routing.active_BTH, heads, M, call.positions)
            acc.add_rows(heads, rows.flat_BPM, _partial_heads(call, rows, device, tuning))
        return acc.finish()


def _decode_step(call: AttentionCall, tuning: SparseTuning) -> Tensor:
    """One new token per sequence on CUDA: every head's query (a decode step reads weights once
    anyway), attention only for the active heads with the split-K Triton kernel, which reads only
    their KV cache (the step is memory bound: the cache dominates the bytes), gated, then one dense
    output projection (zeros for inactive heads). No host sync, no plan."""
    from moh.backends.sparse import triton_kernels as tk

    B, _, H = call.shape
    q = call.q.heads(0, H)[:, 0]  # (B, H, hd)
    key_mask = None if call.key_mask is None else call.key_mask[:, -1]  # (B, S) of the one query
    head = tk.decode_attention(q, call.k.to(q.dtype), call.v.to(q.dtype), call.routing.active_BTH[:, 0],
                               scale=call.scale, key_mask=key_mask, tuning=tuning.triton_tuning)
    gated = head * call.routing.gates_BTH[:, 0, :, None].to(head.dtype)  # (B, H, hd)
    return call.out.dense(gated[:, None])


def _job(call: AttentionCall, q: Tensor, heads: list[int], qpos: Optional[Tensor], row_mask: Optional[Tensor],
         every_row: bool) -> Attend:
    S = call.k.shape[2]
    key_mask = call.key_mask if call.key_mask is not None and call.key_mask.shape[1] == 1 else None
    return Attend(q=q, keys=call.k, values=call.v, heads=heads, num_heads=call.shape[2], qpos=qpos, row_mask=row_mask,
                  key_mask=key_mask, causal=call.causal, last_key_horizon=call.q_offset >= S - 1, every_row=every_row,
                  scale=call.scale, dropout_p=call.dropout_p)


def _full_run(call: AttentionCall, h0: int, h1: int, device: str, tuning: SparseTuning) -> Tensor:
    """Heads h0..h1-1 for every token, gated -> (B, T, P, hd)."""
    B, T, H = call.shape
    q = call.q.heads(h0, h1).transpose(1, 2)  # (B, P, T, hd)
    qpos = None  # key index of every query, only needed by the causal row kernels
    if call.causal and call.q_offset < call.k.shape[2] - 1:
        qpos = (torch.arange(T, device=q.device) + call.q_offset).expand(B, 1, T)
    row_mask = call.key_mask[:, None] if call.key_mask is not None and call.key_mask.shape[1] == T else None
    job = _job(call, q, list(range(h0, h1)), qpos, row_mask, every_row=call.q_offset == 0)
    head = attend(job, device, tuning)  # (B, P, T, hd)
    return (head * call.routing.gates_BTH[..., h0:h1].transpose(1, 2)[..., None].to(head.dtype)).transpose(1, 2)


def _partial_heads(call: AttentionCall, rows, device: str, tuning: SparseTuning) -> Tensor:
    """The gathered rows of partially used heads, gated -> (B, P, M, hd)."""
    q = call.q.rows(rows.heads, rows.tokens_BPM, rows.positions_BPM)  # (B, P, M, hd)
    job = _job(call, q, rows.heads, rows.key_index(call.q_offset), rows_mask(call.key_mask, rows), every_row=False)
    head = attend(job, device, tuning)
    return head * row_gates(call.routing.gates_BTH, rows)[..., None].to(head.dtype)


BACKENDS.register("sparse")(SparseBackend())
