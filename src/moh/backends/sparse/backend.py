"""The sparse backend: work only for the (token, head) pairs the router selected.

After one look at the routing (a host sync, once per layer) a ``Plan`` splits the heads:

* *full* heads, used by (nearly) every token: contiguous runs of them are computed together with
  no gather, reading keys, values and weights as views (no copies, also of the KV cache);
* *partial* heads, used by some tokens: in chunks (on CPU one head each), the rows that use each
  head are gathered (padded to the largest count over the batch, padding gated to 0), only those
  queries are projected (all chunks in one projection), attend over the keys/values of all
  positions, and their gated outputs are projected with W_O^h (only those rows) into the output
  (all pieces in one autograd node, gate included; on CPU both projections and their gradients
  run as moh's C++ kernels, ``tuning.cpu_projections``). Heads no token uses cost nothing.

A single new token (a decode step) skips the plan: ``_one_token`` runs the heads any sequence uses
by contiguous runs. Keys/values are computed for every token by the caller. Which attention kernel
runs is one function of device, dtype, mask kind, rows and keys (``kernels.choose_kernel``); its
constants are a per-device ``SparseTuning``.

Shape legend: B batch, T queries, S key positions, D width, H heads, P heads in a group,
M rows per head, hd head width.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moh.backends.base import BACKENDS, AttentionCall, masked_softmax
from moh.backends.sparse.kernels import Attend, attend, triton_available
from moh.backends.sparse.plan import Plan, make_plan, runs
from moh.backends.sparse.rows import gather_rows, row_gates, rows_mask
from moh.backends.sparse.tuning import SparseTuning, tuning_for
from moh.kernels import cpu as cpu_kernels
from moh.layers.norm import RMSNorm
from moh.layers.projection import has_forward_hooks
from moh.layers.rope import RotaryEmbedding


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
        if T == 1:
            if device == "cuda" and tuning.triton and call.dropout_p == 0 and triton_available():
                return _decode_step(call, tuning)
            if B == 1 and device == "cpu" and tuning.cpu_decode:
                weights = _cpu_decode_weights(call)
                if weights is not None:
                    return _one_token_cpu(call, weights)
            if call.dropout_p == 0:
                return _one_token(call, per_sequence=B > 1 and call.k.shape[2] >= tuning.decode_per_sequence_keys)
        counts = call.routing.active_BTH.sum(1).tolist()  # (B, H) tokens per item and head
        plan = make_plan(counts, T=T, S=call.k.shape[2], D=call.q.x.shape[-1], causal=call.causal,
                         element_size=call.q.x.element_size(), threads=torch.get_num_threads(), tuning=tuning)
        projections = device == "cpu" and tuning.cpu_projections
        acc = call.out.start(B, T, cpu_kernels=projections)
        gates = call.routing.gates_BTH
        kv = _kv_pieces(call, plan)  # {first head: its keys/values} of runs and chunks
        for h0, h1 in plan.full:
            acc.add_heads(h0, h1, _full_run(call, h0, h1, device, tuning, kv.get(h0)), gates[..., h0:h1])
        if plan.partial:
            # the rows of every partially used head at once, then each chunk's view of them; the
            # queries of all chunks in one projection (one input gradient in backward)
            everyone = gather_rows(call.routing.active_BTH, [h for heads, _ in plan.partial for h in heads],
                                   max(M for _, M in plan.partial), call.positions)
            all_gates = row_gates(gates, everyone)  # (B, P, M) for every partial head at once
            chunks, chunk_gates, p0 = [], [], 0
            for heads, M in plan.partial:
                chunks.append(everyone.narrow(p0, len(heads), M))
                chunk_gates.append(all_gates[:, p0 : p0 + len(heads), :M])
                p0 += len(heads)
            queries = call.q.rows_many([(rows.heads, rows.tokens_BPM, rows.positions_BPM) for rows in chunks],
                                       cpu_kernels=projections)
            for (heads, M), rows, q, g in zip(plan.partial, chunks, queries, chunk_gates):
                # rows past a head's own count pad it to the chunk's M: kernels that can skip them do
                real = [[c[h] for h in heads] for c in counts]
                padded = any(n != M for r in real for n in r)
                out = _partial_heads(call, rows, q, kv.get(heads[0]), device, tuning,
                                     torch.tensor(real) if padded else None)
                acc.add_rows(rows.heads, rows.flat_BPM, out, g, real if padded else None)
        return acc.finish()


def _kv_pieces(call: AttentionCall, plan: Plan) -> dict[int, tuple[Tensor, Tensor]]:
    """{first query head: (k, v) (B, P, S, hd)} for the runs of whole heads and the chunks of
    gathered heads (contiguous heads), as pieces of one split (or unbind) of the keys/values, whose
    backward assembles each gradient once: a slice per chunk would give each its own full-size
    key/value gradient to add up (2 x 6 MB per chunk at N=2048). Without grouped-query attention
    the runs are pieces too (``_SplitHeads``; with slices next to the pieces, a profile of one
    training step at N=2048 showed 9 of 290 ms in zero fills, adds and copies of those
    gradients); with it, only one-head chunks get pieces (their key/value head's) and runs read
    slices. Empty where a chunk's heads are not contiguous (or, with grouped-query attention, where
    a chunk holds several heads)."""
    H, G = call.shape[2], call.k.shape[1]
    if not plan.partial:
        return {}
    if G != H:
        if any(len(heads) != 1 for heads, _ in plan.partial):
            return {}
        k, v = call.k.unbind(1), call.v.unbind(1)
        return {heads[0]: (k[heads[0] // (H // G)].unsqueeze(1), v[heads[0] // (H // G)].unsqueeze(1))
                for heads, _ in plan.partial}
    if any(heads != list(range(heads[0], heads[0] + len(heads))) for heads, _ in plan.partial):
        return {}  # a chunk of scattered heads reads a gather of them
    bounds = sorted([(h0, h1) for h0, h1 in plan.full] + [(heads[0], heads[0] + len(heads)) for heads, _ in plan.partial])
    cuts, h = [], 0
    for h0, h1 in bounds:  # unused heads between them: pieces of their own
        cuts += [(h, h0)] if h0 > h else []
        cuts.append((h0, h1))
        h = h1
    cuts += [(h, H)] if H > h else []
    sizes = [h1 - h0 for h0, h1 in cuts]
    if torch.is_grad_enabled() and (call.k.requires_grad or call.v.requires_grad):
        ks, vs = _SplitHeads.apply(call.k, sizes), _SplitHeads.apply(call.v, sizes)
    else:  # no backward: the views alone (an autograd node costs ~0.1 ms per layer call)
        ks, vs = call.k.split(sizes, dim=1), call.v.split(sizes, dim=1)
    return {h0: (k, v) for (h0, _), k, v in zip(cuts, ks, vs)}


class _SplitHeads(torch.autograd.Function):
    """``t.split(sizes, dim=1)`` whose backward writes the pieces' gradients into one tensor laid
    out as ``t`` is (``empty_like``'s strides: keys/values are (B, S, G, hd) projections seen as
    (B, G, S, hd)), where ``split``'s ``cat`` makes a (B, G, S, hd)-contiguous gradient that the projection's
    backward then copies once more (N=2048: 2.4 ms per tensor and training step)."""

    @staticmethod
    def forward(ctx, t: Tensor, sizes: list[int]):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        # the layout only (empty_like's strides, found on the meta device): saving t would keep
        # the keys/values alive until this backward, the last of the layer's (+5 MB at N=2048)
        ctx.layout = (t.shape, torch.empty_like(t, device="meta").stride(), t.dtype, t.device)
        ctx.sizes = sizes
        return t.split(sizes, dim=1)

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):  # type: ignore[override]
        shape, stride, dtype, device = ctx.layout
        g, h0 = torch.empty_strided(shape, stride, dtype=dtype, device=device), 0
        for size, d in zip(ctx.sizes, grads):
            piece = g[:, h0 : h0 + size]
            piece.zero_() if d is None else piece.copy_(d)
            h0 += size
        return g, None


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


_DecodeWeights = tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]  # W_Q, b_Q, W_O, b_O


def _cpu_decode_weights(call: AttentionCall) -> Optional[_DecodeWeights]:
    """(W_Q, b_Q, W_O, b_O) where moh's CPU decode kernel (``moh.kernels.cpu.decode_token``) can
    run this one-token step of one sequence, else None: plain fp32 linear query/output
    projections, fp32 cache and gates, unit last strides, a key-padding mask or none, no gradient
    needed (it has no backward), and the kernels built. (Weights from the modules' parameter
    dicts, not through ``nn.Module.__getattr__``: a decode step is short.)"""
    q, out = call.q, call.out
    if not (q.sliceable and out.sliceable and call.dropout_p == 0):
        return None
    qp, op = q.proj._parameters, out.proj._parameters  # sliceable: the weights are parameters there
    weights = (qp["weight"], qp.get("bias"), op["weight"], op.get("bias"))
    tensors = [q.x, call.routing.gates_BTH, call.k, call.v, *(w for w in weights if w is not None)]
    if any(t.dtype != torch.float32 or t.stride(-1) != 1 for t in tensors) or call.routing.active_BTH.stride(-1) != 1:
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    mask = call.key_mask
    if mask is not None and (mask.shape[1] != 1 or mask.stride(-1) != 1):
        return None
    return weights if cpu_kernels.available() else None


def _one_token_cpu(call: AttentionCall, weights: _DecodeWeights) -> Tensor:
    """One new token of one sequence on CPU in one call of moh's kernel
    (``moh.kernels.cpu.decode_token``): the queries of its active heads only (their rows of W_Q,
    or rows of the raw projection a router made), their qk-norm and RoPE, their attention over
    their KV cache read in place, their gated output projection (their columns of W_O) and the
    bias, where the torch-operation path (``_one_token``) costs ~150 small operations per layer
    and reads every head's query and output weights. ``weights``: (W_Q, b_Q, W_O, b_O) from
    ``_cpu_decode_weights``. The (1, 1, ...) tensors go in as they are. qk-norm and RoPE other
    than moh's RMSNorm and rotate-half run as their modules, on every head's query (the raw
    projection), before the kernel."""
    q, routing = call.q, call.routing
    wq, bq, wo, bo = weights
    raw, norm_w, eps, cos, sin = q.raw() if q.has_raw else None, None, 0.0, None, None
    if not (q.q_norm is None or type(q.q_norm) is RMSNorm and not has_forward_hooks(q.q_norm)) or \
            not (q.rotary is None or type(q.rotary) is RotaryEmbedding):
        raw = q.finish(q.raw()).to(torch.float32).contiguous()  # (1, 1, H, hd), normed and rotated
    else:
        if q.q_norm is not None:
            norm_w, eps = q.q_norm.weight.float().contiguous(), float(q.q_norm.eps)
        if q.rotary is not None:
            cos, sin = (t.contiguous() for t in q.rotary.cos_sin(q.positions, torch.float32))  # (1, 1, hd)
    return cpu_kernels.decode_token_into(wo.new_empty(1, 1, wo.shape[0]), q.x, wq, bq, routing.active_BTH,
                                         routing.gates_BTH, call.k, call.v, call.key_mask, call.scale, wo, bo, raw,
                                         norm_w, eps, cos, sin)


def _one_token(call: AttentionCall, per_sequence: bool = False) -> Tensor:
    """One new token per sequence (a decode step): no plan, no row gathering; the step is memory
    bound and short, so it is built from few operations, and keys/values are read as views of the
    cache (never copied).

    The heads read are those any sequence uses (a head some sequences do not use gets gate 0
    there), or with ``per_sequence`` each sequence's own (a batch over a long cache, where reading
    the union would read the cache of heads a sequence does not use). One contiguous run of heads
    (of whole key/value groups) reads only its query and output weight slices. Otherwise every
    head's query comes from one projection, attention runs over contiguous runs of the *key/value heads* any used head reads
    (with grouped-query attention the query heads of a group are rows of one product against its
    keys: reading the group's cache is the cost, its unused heads' rows are nearly free and gated
    to 0), and the gated head outputs (zeros for unused heads) are projected once: a few
    operations per run, where slices cost a projection, RoPE and an output product each
    (measured faster from two runs on: RESULTS.md, issue 11). Scores as q @ k^T."""
    B, _, H = call.shape
    G = call.k.shape[1]
    r = H // G  # query heads per key/value head
    active = call.routing.active_BTH[:, 0]  # (B, H)
    if per_sequence:
        used = active.tolist()
        groups = [(slice(b, b + 1), runs(sorted({h // r for h in range(H) if used[b][h]}))) for b in range(B)]
    else:
        used_any = active.any(0).tolist()
        head_runs = runs([h for h in range(H) if used_any[h]])
        if len(head_runs) == 1 and head_runs[0][0] % r == 0 and head_runs[0][1] % r == 0:  # whole groups
            return _one_run(call, *head_runs[0])
        groups = [(slice(None), runs(sorted({h // r for h in range(H) if used_any[h]})))]
    hd = call.v.shape[-1]
    q = (call.q.heads(0, H) * call.scale).reshape(B, G, r, -1)  # (B, 1, H, hd) -> the rows of each group
    heads = q.new_zeros(B, G, r, hd)
    for rows, group_runs in groups:
        key_mask = None if call.key_mask is None else call.key_mask[rows, :, None]  # (b, 1, 1, S)
        for g0, g1 in group_runs:
            k, v = call.k[rows, g0:g1], call.v[rows, g0:g1]  # (b, n, S, hd) views of the cache
            scores = q[rows, g0:g1].to(k.dtype) @ k.transpose(-1, -2)  # (b, n, r, S)
            heads[rows, g0:g1] = (masked_softmax(scores, key_mask).to(v.dtype) @ v).to(heads.dtype)
    gated = heads.view(B, H, hd) * call.routing.gates_BTH[:, 0, :, None].to(heads.dtype)  # 0: unused heads
    return call.out.dense(gated[:, None])


def _one_run(call: AttentionCall, h0: int, h1: int) -> Tensor:
    """A decode step whose sequences all use heads h0..h1-1 only (or a subset), whole key/value
    groups: their query and output weight slices, two matrix-vector products per group of rows."""
    B, _, H = call.shape
    G = call.k.shape[1]
    r = H // G
    key_mask = None if call.key_mask is None else call.key_mask[:, :, None]  # (B, 1, 1, S): this query's keys
    q = (call.q.heads(h0, h1) * call.scale).reshape(B, (h1 - h0) // r, r, -1)  # (B, groups, r, hd)
    k, v = call.k[:, h0 // r:h1 // r], call.v[:, h0 // r:h1 // r]  # (B, groups, S, hd) views
    scores = q.to(k.dtype) @ k.transpose(-1, -2)  # (B, groups, r, S)
    head = (masked_softmax(scores, key_mask).to(v.dtype) @ v).reshape(B, 1, h1 - h0, -1)  # (B, 1, P, hd)
    acc = call.out.start(B, 1)
    acc.add_heads(h0, h1, head, call.routing.gates_BTH[..., h0:h1])
    return acc.finish()


def _job(call: AttentionCall, q: Tensor, heads: list[int], qpos: Optional[Tensor], row_mask: Optional[Tensor],
         every_row: bool, kv: Optional[tuple[Tensor, Tensor]] = None, counts: Optional[Tensor] = None) -> Attend:
    """``kv``: the keys/values of ``heads`` (B, P, S, hd), one key/value head per head, instead of
    all of them. ``counts``: (B, P) real rows of each item and head (the rest padding), or None."""
    S = call.k.shape[2]
    key_mask = call.key_mask if call.key_mask is not None and call.key_mask.shape[1] == 1 else None
    P = len(heads)
    keys, values, num_heads = (call.k, call.v, call.shape[2]) if kv is None else (*kv, P)
    return Attend(q=q, keys=keys, values=values, heads=heads if kv is None else list(range(P)), num_heads=num_heads,
                  qpos=qpos, row_mask=row_mask, key_mask=key_mask, causal=call.causal,
                  last_key_horizon=call.q_offset >= S - 1, every_row=every_row, scale=call.scale,
                  dropout_p=call.dropout_p, counts=counts)


def _full_run(call: AttentionCall, h0: int, h1: int, device: str, tuning: SparseTuning,
              kv: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """Heads h0..h1-1 for every token, not gated -> (B, T, P, hd). ``kv``: their keys/values
    (B, P, S, hd) (pieces of ``_kv_pieces``), else slices of all of them."""
    B, T, H = call.shape
    q = call.q.heads(h0, h1).transpose(1, 2)  # (B, P, T, hd)
    qpos = None  # key index of every query, only needed by the causal row kernels
    if call.causal and call.q_offset < call.k.shape[2] - 1:
        qpos = (torch.arange(T, device=q.device) + call.q_offset).expand(B, 1, T)
    row_mask = call.key_mask[:, None] if call.key_mask is not None and call.key_mask.shape[1] == T else None
    job = _job(call, q, list(range(h0, h1)), qpos, row_mask, every_row=call.q_offset == 0, kv=kv)
    return attend(job, device, tuning).transpose(1, 2)


def _partial_heads(call: AttentionCall, rows, q: Tensor, kv: Optional[tuple[Tensor, Tensor]], device: str,
                   tuning: SparseTuning, counts: Optional[Tensor] = None) -> Tensor:
    """The gathered rows of partially used heads with their queries q (B, P, M, hd), not gated
    -> (B, P, M, hd). ``kv``: the keys/values the chunk's heads read (B, P, S, hd), one per head.
    ``counts``: (B, P) real rows per item and head where some are padding (None: none are)."""
    qpos = rows.key_index(call.q_offset) if call.causal else None  # only causal kernels read it
    job = _job(call, q, rows.heads, qpos, rows_mask(call.key_mask, rows), every_row=False,
               kv=kv, counts=counts)
    return attend(job, device, tuning)


BACKENDS.register("sparse")(SparseBackend())
