"""Attention kernels of the sparse backend and the one function that chooses between them.

Every kernel computes softmax(q k^T * scale) v for an ``Attend`` job: rows of P query heads, each
row at its own key index (its causal horizon), against all S keys of the heads' key/value heads;
rows that may attend to no key give exactly 0 (as ``masked_softmax`` in the reference).

``choose_kernel(device, dtype, mask, rows, keys, dropout, tuning)`` is the whole decision:

    mask "none" / "padding" (bidirectional, or one decoded token that sees every key)
        few rows and no dropout   -> "matmul"     two matmuls (decode steps)
        mask "none", gathered rows (``tuning.cpu_rows_all``) or padded ones (a chunk of several
        heads), CPU, fp32, no dropout, ``tuning.cpu_rows``
                                  -> "cpu_rows_all" moh's C++ rows kernel, every row at the last
                                                  key: skips the padding rows
        else                      -> "sdpa"       fused SDPA (bool mask where the device's SDPA
                                                  zeroes fully masked rows, else additive mask)
    mask "causal" (every query in order from key 0, no padding)
                                  -> "sdpa_causal"
    mask "causal_rows" (gathered rows or a cache offset) / "causal_padding" (with key padding)
        CUDA, ``tuning.triton``, no dropout
                                  -> "triton_rows" moh's Triton kernel (``triton_kernels``)
        mask "causal_rows", CPU, fp32, no dropout, ``tuning.cpu_rows`` and the kernel builds
                                  -> "cpu_rows"   moh's C++ CPU kernel (``moh.kernels.cpu``)
        mask "causal_rows", CPU, fp32, no dropout
                                  -> "flash_rows" torch's fused CPU flash kernel per row block
    anything else causal          -> "blocks"     a hand-written blocked kernel (portable; the
                                                  only one for "causal_row_masks" and dropout)

Shape legend: B batch, P heads, M rows per head, S key positions, hd head width.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from moh.backends.base import masked_softmax
from moh.backends.sparse.rows import kv_for_heads
from moh.backends.sparse.tuning import SparseTuning
from moh.kernels import cpu as cpu_kernels


@dataclass
class Attend:
    q: Tensor  # (B, P, M, hd)
    keys: Tensor  # (B, G, S, hd) every key/value head (views of the cache: never copied here)
    values: Tensor  # (B, G, S, hd)
    heads: list[int]  # the P query heads of q; head h reads key/value head h // (H // G)
    num_heads: int  # H
    qpos: Optional[Tensor]  # (B, P or 1, M) key index of every row, ascending along M; None if not causal
    row_mask: Optional[Tensor]  # (B, P or 1, M, S) bool per-row mask, or None
    key_mask: Optional[Tensor]  # (B, 1, S) bool key padding (used when row_mask is None), or None
    causal: bool
    last_key_horizon: bool  # causal rows whose horizon is the last key (one decoded token): nothing to mask
    every_row: bool  # the rows are all queries in order from key index 0 (no cache offset)
    scale: float
    dropout_p: float
    # (B, P) real rows per item and head, the rest padding (gated 0) that a kernel may skip; or None
    counts: Optional[Tensor] = None

    @cached_property
    def kv(self) -> tuple[Tensor, Tensor]:
        """(k, v) of the P heads, (B, P, S, hd): views for a contiguous run without grouped-query
        attention, else one gather (the torch kernels need them per head)."""
        return kv_for_heads(self.keys, self.values, self.heads, self.num_heads)

    @property
    def k(self) -> Tensor:
        return self.kv[0]

    @property
    def v(self) -> Tensor:
        return self.kv[1]

    def mask_kind(self) -> str:
        """"none" / "padding" (every row sees every allowed key), "causal" (every query in order
        from key 0, nothing else masked), "causal_rows" (rows at their own horizons, no padding),
        "causal_padding" (causal with key padding), "causal_row_masks" (causal with per-row masks)."""
        masked = self.row_mask is not None or self.key_mask is not None
        if not self.causal or self.last_key_horizon:
            return "padding" if masked else "none"
        if self.row_mask is not None:
            return "causal_row_masks"
        if masked:
            return "causal_padding"
        return "causal" if self.every_row else "causal_rows"


def choose_kernel(device: str, dtype: torch.dtype, mask: str, rows: int, keys: int, dropout: bool,
                  tuning: SparseTuning, padded: bool = False, gathered: bool = False) -> str:
    """The kernel for one job; ``device`` a device kind ("cpu", "cuda", ...), ``rows`` the query
    rows per head, ``keys`` the key positions, ``padded``: some heads' rows end in padding,
    ``gathered``: the rows are some of the queries (not all in order)."""
    if mask in ("none", "padding"):
        if rows <= tuning.few_rows and not dropout:
            return "matmul"
        if (padded or gathered and tuning.cpu_rows_all) and mask == "none" and not dropout and \
                dtype == torch.float32 and device == "cpu" and tuning.cpu_rows and cpu_kernels.available():
            return "cpu_rows_all"
        return "sdpa"
    if mask == "causal":
        return "sdpa_causal"
    if mask in ("causal_rows", "causal_padding") and device == "cuda" and tuning.triton and not dropout \
            and triton_available():
        return "triton_rows"
    if mask == "causal_rows" and not dropout and dtype == torch.float32 and device == "cpu":
        if tuning.cpu_rows and cpu_kernels.available():
            return "cpu_rows"
        if tuning.cpu_flash:
            return "flash_rows"
    return "blocks"


def attend(job: Attend, device: str, tuning: SparseTuning) -> Tensor:
    name = choose_kernel(device, job.q.dtype, job.mask_kind(), job.q.shape[2], job.keys.shape[2], job.dropout_p > 0,
                         tuning, padded=job.counts is not None, gathered=not job.every_row)
    return KERNELS[name](job, tuning)


def triton_available() -> bool:
    """Whether the Triton kernels import (triton installed; CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1``)."""
    try:
        import moh.backends.sparse.triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# the kernels


def _bidirectional_mask(job: Attend) -> Optional[Tensor]:
    return job.row_mask if job.row_mask is not None else (None if job.key_mask is None else job.key_mask[:, None])


def _matmul(job: Attend, tuning: SparseTuning) -> Tensor:
    probs = masked_softmax((job.q * job.scale) @ job.k.transpose(-1, -2), _bidirectional_mask(job))
    return probs @ job.v


def _sdpa(job: Attend, tuning: SparseTuning) -> Tensor:
    mask = _bidirectional_mask(job)
    if mask is None or tuning.sdpa_bool_mask:  # torch's CPU SDPA returns 0 for a fully masked bool row
        return F.scaled_dot_product_attention(job.q, job.k, job.v, attn_mask=mask, dropout_p=job.dropout_p,
                                              scale=job.scale)
    bias = torch.zeros(mask.shape, dtype=job.q.dtype, device=job.q.device).masked_fill_(~mask, torch.finfo(job.q.dtype).min)
    out = F.scaled_dot_product_attention(job.q, job.k, job.v, attn_mask=bias, dropout_p=job.dropout_p, scale=job.scale)
    return out * mask.any(-1, keepdim=True).to(out.dtype)  # rows that see no key: 0, not an average


def _sdpa_causal(job: Attend, tuning: SparseTuning) -> Tensor:
    return F.scaled_dot_product_attention(job.q, job.k, job.v, dropout_p=job.dropout_p, is_causal=True, scale=job.scale)


def _flash_rows(job: Attend, tuning: SparseTuning) -> Tensor:
    return causal_flash(job.q, job.k, job.v, job.qpos, job.scale, tuning.flash_grid, tuning.flash_block)


def _rows_kernel(job: Attend, qpos: Tensor, rows_block: int, key_chunk: int, tuning: SparseTuning) -> Tensor:
    dtype = job.q.dtype  # one dtype for the kernel (autocast may leave keys in another)
    return cpu_kernels.rows_attention(job.q, job.k.to(dtype), job.v.to(dtype), qpos, job.scale, rows_block, key_chunk,
                                      tuning.rows_diagonal_chunk, check=False, counts=job.counts)


def _cpu_rows(job: Attend, tuning: SparseTuning) -> Tensor:
    return _rows_kernel(job, job.qpos, tuning.rows_block, tuning.rows_key_chunk, tuning)


def _cpu_rows_all(job: Attend, tuning: SparseTuning) -> Tensor:
    """Bidirectional gathered rows: moh's rows kernel with every row at the last key (it sees them
    all); it skips the padding rows of a chunk of several heads, which SDPA would compute."""
    B, _, M, _ = job.q.shape
    last = torch.full((B, 1, M), job.keys.shape[2] - 1, dtype=torch.int64, device=job.q.device)
    return _rows_kernel(job, last, tuning.rows_block_all, tuning.rows_key_chunk_all, tuning)


def _blocks(job: Attend, tuning: SparseTuning) -> Tensor:
    return causal_blocks(job, tuning.row_block)


def _triton_rows(job: Attend, tuning: SparseTuning) -> Tensor:
    from moh.backends.sparse import triton_kernels as tk

    B, P, M, _ = job.q.shape
    G = job.keys.shape[1]
    kv_head = torch.tensor([h // (job.num_heads // G) for h in job.heads])
    key_mask = None if job.key_mask is None else job.key_mask[:, 0]
    dtype = job.q.dtype  # one dtype for the kernel (autocast may leave keys in another)
    return tk.rows_attention(job.q, job.keys.to(dtype), job.values.to(dtype), job.qpos.expand(B, P, M), kv_head,
                             scale=job.scale, causal=True, key_mask=key_mask, tuning=tuning.triton_tuning)


KERNELS: dict[str, Callable[[Attend, SparseTuning], Tensor]] = {
    "matmul": _matmul, "sdpa": _sdpa, "sdpa_causal": _sdpa_causal, "flash_rows": _flash_rows, "cpu_rows": _cpu_rows, "cpu_rows_all": _cpu_rows_all,
    "blocks": _blocks,
    "triton_rows": _triton_rows,
}


# ---------------------------------------------------------------------------------------------
# causal rows with torch's fused CPU flash kernel


def causal_flash(q: Tensor, k: Tensor, v: Tensor, qpos_BPM: Tensor, scale: float, grid: int, block: int) -> Tensor:
    """Causal attention of rows at ascending key indices ``qpos_BPM`` (B, P or 1, M) with torch's
    fused CPU flash kernel, which never writes the scores out. CPU tensors, fp32, no padding or
    dropout (the merges run in the input dtype).

    Forward, on a grid of ``grid`` key positions: the rows whose key index lies in grid block j see
    keys [0, j * grid) whole (one unmasked call per block and head) and, inside block j, the keys up
    to their own index: for all blocks at once, one causal call over the block's positions with each
    row's query at its own position (zeros elsewhere), so the mask is the kernel's own ``is_causal``
    and no mask tensor is built. The two parts are merged through their log-sum-exps.
    Backward: blocks of ``block`` rows, each with the keys before its first row (unmasked) and its
    diagonal part (a small additive mask), through torch's flash backward with the merged output
    and log-sum-exp (the statistics it needs are the global ones, so the parts' gradients add up).
    3 heads x 850 rows at N=2048, 1 thread: forward 6.1-6.4 ms per head against 7.0-7.6 for the row
    blocks of the backward (SDPA's own causal kernel on the same work: 3.9-4.0 ms)."""
    B, P, M, _ = q.shape
    return _FlashCausalRows.apply(q, k, v, qpos_BPM.expand(B, P, M), scale, grid, block)


def _grid_forward(q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, scale: float, g: int) -> tuple[Tensor, Tensor]:
    """(out (B, P, M, hd), lse (B, P, M)) of ``causal_flash``'s forward."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    B, P, M, hd = q.shape
    S = k.shape[2]
    nblk, nfull = -(-S // g), S // g
    # contiguous keys/values (a view of the layer's (B, S, G, hd) projection has rows G*hd apart):
    # the small-row calls run 25% faster on them (64 rows x 1500 keys: 0.39 vs 0.51 ms), far more
    # than the copy costs (0.12 ms per head at N=2048); big calls and the backward do not care
    k, v = k.contiguous(), v.contiguous()
    edges = torch.arange(nblk + 1, device=q.device) * g
    bounds = torch.searchsorted(qpos.contiguous(), edges.expand(B, P, nblk + 1).contiguous()).tolist()
    o1 = q.new_zeros(B, P, M, hd)  # the keys before each row's grid block
    l1 = q.new_full((B, P, M), float("-inf"))  # (fp32 and fp64 only: the log-sum-exps share the dtype)
    o2, l2 = torch.empty_like(o1), torch.empty_like(l1)  # the keys of its own block, up to its index
    dense = q.new_zeros(B, P, nblk * g, hd).scatter_(2, qpos.unsqueeze(-1).expand(B, P, M, hd), q)
    for b in range(B):
        for p in range(P):
            bd = bounds[b][p]
            for j in range(1, nblk):
                r0, r1 = bd[j], bd[j + 1]
                if r1 > r0:
                    o, lse = flash(q[b : b + 1, p : p + 1, r0:r1], k[b : b + 1, p : p + 1, : j * g],
                                   v[b : b + 1, p : p + 1, : j * g], scale=scale)
                    o1[b, p, r0:r1], l1[b, p, r0:r1] = o[0, 0], lse[0, 0]
            r = bd[nfull]  # rows in whole grid blocks; the rest are in the tail block
            if nfull and r:
                shape = (nfull, 1, g, hd)
                o, lse = flash(dense[b, p, : nfull * g].view(shape), k[b, p, : nfull * g].view(shape),
                               v[b, p, : nfull * g].view(shape), is_causal=True, scale=scale)
                at = qpos[b, p, :r]
                o2[b, p, :r], l2[b, p, :r] = o.view(-1, hd).index_select(0, at), lse.view(-1).index_select(0, at)
            if r < M:
                s0 = nfull * g
                o, lse = flash(dense[b : b + 1, p : p + 1, s0:S], k[b : b + 1, p : p + 1, s0:S],
                               v[b : b + 1, p : p + 1, s0:S], is_causal=True, scale=scale)
                at = qpos[b, p, r:] - s0
                o2[b, p, r:], l2[b, p, r:] = o[0, 0].index_select(0, at), lse[0, 0].index_select(0, at)
    lse = torch.logaddexp(l1, l2)
    out = o1.mul_((l1 - lse).exp_().unsqueeze(-1)).add_(o2.mul_((l2 - lse).exp_().unsqueeze(-1)))
    return out, lse


class _FlashCausalRows(torch.autograd.Function):
    """See ``causal_flash``."""

    @staticmethod
    def forward(ctx, q, k, v, qpos, scale, grid, block):  # type: ignore[override]
        out, lse = _grid_forward(q, k, v, qpos, scale, grid)
        ctx.scale, ctx.block = scale, block
        ctx.save_for_backward(q, k, v, qpos, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        q, k, v, qpos, out, lse = ctx.saved_tensors
        M, block = q.shape[2], ctx.block
        starts = list(range(0, M, block))
        last = [min(s + block, M) - 1 for s in starts]
        bounds = torch.stack([qpos[..., starts].amin((0, 1)), qpos[..., last].amax((0, 1)) + 1]).t().tolist()
        dout = dout.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        neg = torch.finfo(q.dtype).min
        for s, (kd, ke) in zip(starts, bounds):
            e = min(s + block, M)
            qb, ob, lb, db = q[:, :, s:e], out[:, :, s:e], lse[:, :, s:e], dout[:, :, s:e]
            # row m may not see key kd + j beyond its own index
            future = torch.arange(kd, ke, device=q.device) > qpos[:, :, s:e, None]  # (B, P, rows, ke - kd)
            mask = torch.zeros(future.shape, dtype=q.dtype, device=q.device).masked_fill_(future, neg)
            gq, gk, gv = flash_backward(db, qb, k[:, :, kd:ke], v[:, :, kd:ke], ob, lb, 0.0, False,
                                        attn_mask=mask, scale=ctx.scale)
            dk[:, :, kd:ke] += gk
            dv[:, :, kd:ke] += gv
            if kd > 0:
                gq1, gk1, gv1 = flash_backward(db, qb, k[:, :, :kd], v[:, :, :kd], ob, lb, 0.0, False, scale=ctx.scale)
                gq = gq + gq1
                dk[:, :, :kd] += gk1
                dv[:, :, :kd] += gv1
            dq[:, :, s:e] = gq
        return dq, dk, dv, None, None, None, None


# ---------------------------------------------------------------------------------------------
# causal rows in blocks, portable (padding, dropout, any dtype and device)


def causal_blocks(job: Attend, block: int) -> Tensor:
    """Causal attention in blocks of ``block`` rows. A block reads keys only up to its last query;
    keys up to its first query are visible to all its rows, so only the diagonal part after them
    is masked."""
    q, qpos_BPM, mask_BPMS = job.q * job.scale, job.qpos, job.row_mask
    M, S = q.shape[2], job.k.shape[2]
    neg = torch.finfo(q.dtype).min
    bias = None  # key padding as one additive row per item
    if mask_BPMS is None and job.key_mask is not None:
        bias = torch.zeros(job.key_mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill_(~job.key_mask, neg)[:, None]  # (B, 1, 1, S)
    starts = list(range(0, M, block))
    last = [min(s + block, M) - 1 for s in starts]
    bounds = (torch.stack([qpos_BPM[..., starts].amin((0, 1)), qpos_BPM[..., last].amax((0, 1))]) + 1).clamp(max=S)
    blocks = [(s, min(s + block, M), kdiag, kend) for s, (kdiag, kend) in zip(starts, bounds.t().tolist())]

    def mask_(scores: Tensor, s: int, e: int, kdiag: int, kend: int) -> None:
        """Mask one fresh score block (B, P, rows, kend) in place."""
        if bias is not None:
            scores += bias[..., :kend]
        if mask_BPMS is not None:
            scores.masked_fill_(~mask_BPMS[:, :, s:e, :kend], neg)
        if kdiag < kend:
            future = torch.arange(kdiag, kend, device=scores.device) > qpos_BPM[..., s:e, None]
            scores[..., kdiag:kend].masked_fill_(future, neg)

    out = _BlockAttention.apply(q, job.k, job.v, blocks, mask_, job.dropout_p)
    alive = _alive(job)
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
            do = dout[:, :, s:e].to(probs.dtype)
            used = probs if keep is None else probs * keep / (1 - p_drop)
            dv[:, :, :kend] += used.transpose(-1, -2) @ do
            dp = do @ v[:, :, :kend].transpose(-1, -2)  # (B, P, rows, kend)
            if keep is not None:
                dp = dp * keep / (1 - p_drop)
            ds = (dp - (dp * probs).sum(-1, keepdim=True)).mul_(probs)  # softmax backward
            dq[:, :, s:e] = ds @ k[:, :, :kend]
            dk[:, :, :kend] += ds.transpose(-1, -2) @ q[:, :, s:e]
        return dq, dk, dv, None, None, None


def _alive(job: Attend) -> Optional[Tensor]:
    """(B, P or 1, M): 0 for causal query rows that may attend to no key, 1 elsewhere; None when
    no row can be dead (no mask: every query sees at least key 0)."""
    qpos_BPM, dtype = job.qpos, job.q.dtype
    if job.row_mask is not None:
        S = job.row_mask.shape[-1]
        return (job.row_mask & (torch.arange(S, device=qpos_BPM.device) <= qpos_BPM[..., None])).any(-1).to(dtype)
    if job.key_mask is None:
        return None
    key_ok = job.key_mask[:, 0]  # (B, S)
    first_ok = torch.where(key_ok.any(-1), key_ok.int().argmax(-1), key_ok.shape[-1])  # (B,)
    return (first_ok[:, None, None] <= qpos_BPM).to(dtype)
