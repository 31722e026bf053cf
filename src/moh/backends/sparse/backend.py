"""The sparse backend: work only for the (token, head) pairs the router selected.

Heads are split in two groups after one look at the routing (a host sync, once per layer):

* *full* heads, used by every token (shared heads, the ``all`` router, most heads of a one-token
  decode step): contiguous runs of them are computed together with no gather, reading the keys,
  values and weights as views (no copies, also of the KV cache);
* *partial* heads, used by some tokens: for all of them at once, gather the rows that use each
  head (padded to the largest count, padding gated to 0), project only those queries, attend over
  the keys/values of all positions, weight by the gate, project with W_O^h (only those rows) and
  add into the output. Heads no token uses cost nothing.

Keys/values are computed for every token by the caller. Attention is fused SDPA, except for
causal attention of gathered rows (or with a cache or padding), which runs in blocks of
``ROW_BLOCK`` rows sorted by position: a block reads keys only up to its last query and masks only
the diagonal part past its first query; its backward is written by hand (``_BlockAttention``).
A fixed number of large operations per layer (not a loop over heads) keeps the Python and
thread-synchronisation overhead small.

Shape legend: B batch, T queries, S key positions, D width, P heads in a group, M rows per head,
hd head width.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from moh.backends.base import BACKENDS, AttentionCall, masked_softmax

ROW_BLOCK = 128  # causal query rows per score block (tuned on a 2-core CPU, D=768, hd=64)
# Partial heads are processed a few at a time so their gathered rows (B, P, M, D) stay near this
# size: measured faster than one large batch (at 75% heads, N=2048, D=768: 284 vs 322 ms CPU),
# large temporaries being slow to allocate and falling out of cache.
CHUNK_BYTES = 8 << 20
# Fraction of rows from which a head is computed for all rows instead of gathered. A gathered
# (row, head) costs more than one of a head computed whole (gather, 64-wide projections, and for
# causal attention blocks of rows instead of SDPA's causal kernel).
DENSE_FROM = 0.85
DENSE_FROM_CAUSAL = 0.6
# Rows are gathered only when there are at least this many key positions per unit of width:
# gathering lost at every head ratio for a tiny ViT (17 keys, D=128: 1139 vs 1757 images/s at 50%)
# and won at 512 keys for D=768 (1 thread; at 2 threads about even).
GATHER_MIN_KEYS_PER_WIDTH = 0.5
FLASH_BLOCK = 64  # rows per block of ``_causal_flash`` (32-256 measured: 64 best for forward+backward)
FEW_ROWS = 4  # query rows per head up to which plain matmuls replace SDPA (decode steps)


def _attend(
    call: AttentionCall, q: Tensor, k: Tensor, v: Tensor, qpos_BPM: Tensor, mask_BPMS: Optional[Tensor], every_row: bool
) -> Tensor:
    """softmax(q k^T * scale) v for q (B, P, M, hd) at key indices ``qpos_BPM`` (B, P or 1, M),
    ascending along M; k, v (B, P, S, hd). Returns (B, P, M, hd).

    ``mask_BPMS``: per-row bool mask, or None (then the key padding ``call.key_mask`` applies).
    ``every_row``: the rows are all T queries in order (SDPA's own causal path can be used).
    Rows that may attend to no key give 0 (as ``masked_softmax`` in the reference).
    """
    S = k.shape[2]
    if not call.causal or call.q_offset >= S - 1:  # bidirectional, or decoding one token
        if mask_BPMS is None and call.key_mask is not None:
            mask_BPMS = call.key_mask[:, None]  # (B, 1, 1, S)
        if q.shape[2] <= FEW_ROWS and call.dropout_p == 0:
            # a decode step: CPU SDPA on a few query rows of a few heads is several times slower
            # than two matmuls (measured 1.7 vs 0.8 ms for 6 heads in 4 runs over a 4k cache)
            probs = masked_softmax((q * call.scale) @ k.transpose(-1, -2), mask_BPMS)
            return probs @ v
        # fused SDPA; it returns 0 for a fully masked bool row
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BPMS, dropout_p=call.dropout_p, scale=call.scale)
    if mask_BPMS is None and call.key_mask is None and every_row and call.q_offset == 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=call.dropout_p, is_causal=True, scale=call.scale)
    if mask_BPMS is None and call.key_mask is None and call.dropout_p == 0 and q.dtype == torch.float32:
        return _causal_flash(q, k, v, qpos_BPM, call.scale)
    return _causal_blocks(call, q * call.scale, k, v, qpos_BPM, mask_BPMS)


def _causal_flash(q: Tensor, k: Tensor, v: Tensor, qpos_BPM: Tensor, scale: float) -> Tensor:
    """Causal attention of rows at ascending key indices ``qpos_BPM`` with torch's fused CPU flash
    kernel, in blocks of ``FLASH_BLOCK`` rows: keys before a block's first row are visible to all
    its rows (one unmasked flash call), keys from its first to its last row need a mask (a second,
    small call); the two partial softmaxes are merged through their log-sum-exps. Scores never leave
    the cache: for 3 heads x 830 rows at N=2048 17.8 vs 24.7 ms for ``_causal_blocks`` (1 thread);
    for one head, or at the level of a whole layer, the two are close. Used without padding or
    dropout, in fp32 (the merge runs in the input dtype)."""
    M = q.shape[2]
    starts = list(range(0, M, FLASH_BLOCK))
    last = [min(s + FLASH_BLOCK, M) - 1 for s in starts]
    bounds = torch.stack([qpos_BPM[..., starts].amin((0, 1)), qpos_BPM[..., last].amax((0, 1)) + 1])
    blocks = [(s, min(s + FLASH_BLOCK, M), kd, ke) for s, (kd, ke) in zip(starts, bounds.t().tolist())]
    # additive masks of every block's diagonal part, made at once: row m of a block starting at key
    # kd may not see key kd + j beyond its own index; block b is a view [..., s:e, :ke - kd]
    width = max(ke - kd for _, _, kd, ke in blocks)
    first = bounds[0].repeat_interleave(FLASH_BLOCK)[:M, None]  # (M, 1) kd of each row's block
    future = first + torch.arange(width, device=q.device) > qpos_BPM[..., None]  # (B, P or 1, M, width)
    bias = torch.zeros(future.shape, dtype=q.dtype, device=q.device).masked_fill_(future, torch.finfo(q.dtype).min)
    biases = [bias[..., s:e, : ke - kd] for s, e, kd, ke in blocks]
    return _FlashCausalRows.apply(q, k, v, blocks, biases, scale)


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _FlashCausalRows(torch.autograd.Function):
    """See ``_causal_flash``. Backward: the flash backward of each key part, given the *merged*
    output and log-sum-exp, is exactly the gradient through that part's keys (the softmax
    statistics it recomputes are the global ones), so the parts' gradients simply add up."""

    @staticmethod
    def forward(ctx, q, k, v, blocks, biases, scale):  # type: ignore[override]
        outs, lses = [], []
        for (s, e, kd, ke), bias in zip(blocks, biases):
            qb = q[:, :, s:e]
            o, lse = _flash(qb, k[:, :, kd:ke], v[:, :, kd:ke], attn_mask=bias.expand(*qb.shape[:2], -1, -1), scale=scale)
            if kd > 0:  # merge with the part every row sees
                o1, lse1 = _flash(qb, k[:, :, :kd], v[:, :, :kd], scale=scale)
                merged = torch.logaddexp(lse, lse1)
                o = o * (lse - merged).exp().unsqueeze(-1) + o1 * (lse1 - merged).exp().unsqueeze(-1)
                lse = merged
            outs.append(o)
            lses.append(lse)
        out = torch.cat(outs, dim=2)
        ctx.blocks, ctx.biases, ctx.scale = blocks, biases, scale
        ctx.save_for_backward(q, k, v, out, torch.cat(lses, dim=2))
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for (s, e, kd, ke), bias in zip(ctx.blocks, ctx.biases):
            qb, ob, lb, db = q[:, :, s:e], out[:, :, s:e], lse[:, :, s:e], dout[:, :, s:e]
            mask = bias.expand(*qb.shape[:2], -1, -1)
            gq, gk, gv = _flash_backward(db, qb, k[:, :, kd:ke], v[:, :, kd:ke], ob, lb, 0.0, False,
                                         attn_mask=mask, scale=ctx.scale)
            dk[:, :, kd:ke] += gk
            dv[:, :, kd:ke] += gv
            if kd > 0:
                gq1, gk1, gv1 = _flash_backward(db, qb, k[:, :, :kd], v[:, :, :kd], ob, lb, 0.0, False, scale=ctx.scale)
                gq = gq + gq1
                dk[:, :, :kd] += gk1
                dv[:, :, :kd] += gv1
            dq[:, :, s:e] = gq
        return dq, dk, dv, None, None, None


def _causal_blocks(
    call: AttentionCall, q: Tensor, k: Tensor, v: Tensor, qpos_BPM: Tensor, mask_BPMS: Optional[Tensor]
) -> Tensor:
    """Causal attention of pre-scaled queries in blocks of ``ROW_BLOCK`` rows. A block reads keys
    only up to its last query; keys up to its first query are visible to all its rows, so only
    the diagonal part after them is masked."""
    M, S = q.shape[2], k.shape[2]
    neg = torch.finfo(q.dtype).min
    bias = None  # key padding as one additive row per item
    if mask_BPMS is None and call.key_mask is not None:
        bias = torch.zeros(call.key_mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill_(~call.key_mask, neg)[:, None]  # (B, 1, 1, S)
    starts = list(range(0, M, ROW_BLOCK))
    last = [min(s + ROW_BLOCK, M) - 1 for s in starts]
    bounds = (torch.stack([qpos_BPM[..., starts].amin((0, 1)), qpos_BPM[..., last].amax((0, 1))]) + 1).clamp(max=S)
    blocks = [(s, min(s + ROW_BLOCK, M), kdiag, kend) for s, (kdiag, kend) in zip(starts, bounds.t().tolist())]

    def mask_(scores: Tensor, s: int, e: int, kdiag: int, kend: int) -> None:
        """Mask one fresh score block (B, P, rows, kend) in place."""
        if bias is not None:
            scores += bias[..., :kend]
        if mask_BPMS is not None:
            scores.masked_fill_(~mask_BPMS[:, :, s:e, :kend], neg)
        if kdiag < kend:
            future = torch.arange(kdiag, kend, device=scores.device) > qpos_BPM[..., s:e, None]
            scores[..., kdiag:kend].masked_fill_(future, neg)

    out = _BlockAttention.apply(q, k, v, blocks, mask_, call.dropout_p)
    alive = _alive(call, qpos_BPM, mask_BPMS)
    return out if alive is None else out * alive[..., None]


class _BlockAttention(torch.autograd.Function):
    """softmax(q k^T) v over row blocks, each reading keys [0, kend). The backward is written by
    hand so every block adds its key/value gradient into one buffer in place; autograd through
    per-block key slices would allocate and sum a full-size gradient per block."""

    @staticmethod
    def forward(ctx, q, k, v, blocks, mask_, dropout_p):  # type: ignore[override]
        outs, saved = [], []
        for s, e, kdiag, kend in blocks:
            scores = q[:, :, s:e] @ k[:, :, :kend].transpose(-1, -2)  # (B, P, rows, kend)
            mask_(scores, s, e, kdiag, kend)
            probs = torch.softmax(scores, dim=-1)
            keep = None
            if dropout_p > 0:
                keep = torch.rand_like(probs) >= dropout_p
                outs.append((probs * keep / (1 - dropout_p)) @ v[:, :, :kend])
            else:
                outs.append(probs @ v[:, :, :kend])
            saved.append((probs, keep))
        ctx.blocks, ctx.saved, ctx.dropout_p = blocks, saved, dropout_p
        ctx.save_for_backward(q, k, v)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        p_drop = ctx.dropout_p
        for (s, e, _, kend), (probs, keep) in zip(ctx.blocks, ctx.saved):
            do = dout[:, :, s:e]
            used = probs if keep is None else probs * keep / (1 - p_drop)
            dv[:, :, :kend] += used.transpose(-1, -2) @ do
            dp = do @ v[:, :, :kend].transpose(-1, -2)  # (B, P, rows, kend)
            if keep is not None:
                dp = dp * keep / (1 - p_drop)
            ds = (dp - (dp * probs).sum(-1, keepdim=True)).mul_(probs)  # softmax backward
            dq[:, :, s:e] = ds @ k[:, :, :kend]
            dk[:, :, :kend] += ds.transpose(-1, -2) @ q[:, :, s:e]
        return dq, dk, dv, None, None, None


def _alive(call: AttentionCall, qpos_BPM: Tensor, mask_BPMS: Optional[Tensor]) -> Optional[Tensor]:
    """(B, P or 1, M): 0 for causal query rows that may attend to no key, 1 elsewhere; None when
    no row can be dead (no mask: every query sees at least key 0)."""
    if mask_BPMS is not None:
        S = mask_BPMS.shape[-1]
        return (mask_BPMS & (torch.arange(S, device=qpos_BPM.device) <= qpos_BPM[..., None])).any(-1).to(call.x.dtype)
    if call.key_mask is None:
        return None
    key_ok = call.key_mask[:, 0]  # (B, S)
    first_ok = torch.where(key_ok.any(-1), key_ok.int().argmax(-1), key_ok.shape[-1])  # (B,)
    return (first_ok[:, None, None] <= qpos_BPM).to(call.x.dtype)


def _kv(call: AttentionCall, heads: list[int]) -> tuple[Tensor, Tensor]:
    """Keys/values read by query ``heads``, (B, P, S, hd): a view for a contiguous run without
    grouped-query attention, else one gather along the head axis."""
    H, G = call.routing.num_heads, call.k.shape[1]
    if G == H and heads == list(range(heads[0], heads[-1] + 1)):
        return call.k[:, heads[0] : heads[-1] + 1], call.v[:, heads[0] : heads[-1] + 1]
    g = torch.tensor([h // (H // G) for h in heads], device=call.k.device)
    return call.k.index_select(1, g), call.v.index_select(1, g)


def _full_run(call: AttentionCall, h0: int, h1: int) -> Tensor:
    """Heads h0..h1-1, used by every token: no gather. Returns their output (B, T, D)."""
    B, T, D = call.x.shape
    hd = call.k.shape[-1]
    q = call.attn.project_queries(call.x, slice(h0, h1), call.positions, call.raw_q).transpose(1, 2)  # (B,P,T,hd)
    k, v = _kv(call, list(range(h0, h1)))
    qpos = None  # key index of every query, only needed by the blocked causal path
    if call.causal and call.q_offset < k.shape[2] - 1:
        qpos = (torch.arange(T, device=q.device) + call.q_offset).expand(B, 1, T)
    mask = call.key_mask[:, None] if call.key_mask is not None and call.key_mask.shape[1] == T else None
    head = _attend(call, q, k, v, qpos, mask, every_row=True)  # (B, P, T, hd)
    head = head * call.routing.gates_BTH[..., h0:h1].transpose(1, 2)[..., None]
    return head.transpose(1, 2).reshape(B, T, -1) @ call.attn.o_proj.weight[:, h0 * hd : h1 * hd].T


def _partial_heads(call: AttentionCall, heads: list[int], M: int, out_nD: Tensor) -> Tensor:
    """``heads`` for the rows that use them only (M = the largest count); adds their output
    into ``out_nD`` (B*T, D)."""
    x = call.x
    B, T, D = x.shape
    H, hd, P = call.routing.num_heads, call.k.shape[-1], len(heads)
    used = call.routing.active_BTH[..., heads].transpose(1, 2)  # (B, P, T)
    t = torch.arange(T, device=x.device)
    order = torch.where(used, t, t + T).argsort(dim=-1)[..., :M]  # used rows first, ascending
    valid = torch.arange(M, device=x.device) < used.sum(-1, keepdim=True)  # (B, P, M)
    idx = torch.where(valid, order, T - 1)  # padding repeats the last row (keeps rows ascending)
    rows = idx + (torch.arange(B, device=x.device) * T)[:, None, None]  # (B, P, M) into B*T
    positions = call.positions.gather(1, idx.view(B, -1)).view(B, P, M)
    if call.raw_q is not None:  # the router projected every query already
        q = call.attn.gather_head_rows(call.raw_q, heads, idx, positions)
    else:
        q = call.attn.project_head_rows(x.reshape(B * T, D), rows, heads, positions)
    k, v = _kv(call, heads)
    mask = call.key_mask
    if mask is not None and mask.shape[1] == T:  # per-query mask: the rows' own
        mask = mask.gather(1, idx.view(B, -1, 1).expand(B, P * M, mask.shape[-1])).view(B, P, M, -1)
    else:
        mask = None
    head = _attend(call, q, k, v, idx + call.q_offset, mask, every_row=False)  # (B, P, M, hd)
    gate = call.routing.gates_BTH[..., heads].transpose(1, 2).gather(2, idx) * valid  # (B, P, M)
    # (P, hd, D), made contiguous (a small copy): bmm on the permuted view is many times slower
    w_out = call.attn.o_proj.weight.view(D, H, hd)[:, heads].permute(1, 2, 0).contiguous()
    y = (head * gate[..., None]) @ w_out  # (B, P, M, D)
    return out_nD.index_add_(0, rows.view(-1), y.reshape(-1, D))


def _runs(heads: list[int]) -> list[tuple[int, int]]:
    """[0, 1, 2, 5, 6] -> [(0, 3), (5, 7)]: contiguous ranges, so a run is one weight slice."""
    runs: list[tuple[int, int]] = []
    for h in heads:
        if runs and runs[-1][1] == h:
            runs[-1] = (runs[-1][0], h + 1)
        else:
            runs.append((h, h + 1))
    return runs


@BACKENDS.register("sparse")
def sparse_attention(call: AttentionCall) -> Tensor:
    x = call.x
    B, T, D = x.shape
    counts = call.routing.active_BTH.sum(1).tolist()  # (B, H) tokens per item and head
    per_head = [sum(c[h] for c in counts) for h in range(len(counts[0]))]
    # a head most rows use is cheaper computed for every row (gate 0 where unused) than gathered;
    # over few keys, any head is (the attention skipped costs less than gathering the rows)
    dense = B * T * (DENSE_FROM_CAUSAL if call.causal and T > 1 else DENSE_FROM)
    if call.k.shape[2] < GATHER_MIN_KEYS_PER_WIDTH * D:
        dense = 0
    out = None
    for h0, h1 in _runs([h for h, n in enumerate(per_head) if n == B * T or 0 < n >= dense]):
        y = _full_run(call, h0, h1)
        out = y if out is None else out + y
    out = x.new_zeros(B * T, D) if out is None else out.reshape(B * T, D)
    partial = [h for h, n in enumerate(per_head) if 0 < n < min(dense, B * T)]  # unused heads: skipped
    rows = max([c[h] for c in counts for h in partial], default=0)
    step = max(1, CHUNK_BYTES // max(B * rows * D * x.element_size(), 1))
    threads = torch.get_num_threads()
    if step > threads:  # whole multiples of the thread count: batched kernels split evenly over heads
        step -= step % threads
    for i in range(0, len(partial), step):
        chunk = partial[i : i + step]
        out = _partial_heads(call, chunk, max(c[h] for c in counts for h in chunk), out)
    return out.view(B, T, D)
