"""Triton kernels of the sparse backend on CUDA: attention of gathered query rows (forward and
backward), split-K decoding that reads only the active heads' KV cache, and a grouped matmul of
rows gathered by index (the per-head query projection without the gather copy).

Pure tensor-level functions; nothing here knows about routing or modules:

* ``rows_attention(q, k, v, qpos, kv_head, *, scale, causal, key_mask=None)`` (autograd)
* ``decode_attention(q, k_cache, v_cache, active, *, scale, lengths=None, key_mask=None)``
* ``gather_matmul(x, rows, w)`` (autograd)

Conventions of the CPU backend kept: ``scale`` is explicit; a row that may attend to no key gives
exactly 0 (as ``masked_softmax``), never NaN; softmax statistics and accumulators are fp32 whatever
the input dtype (bf16, fp16, fp32); outputs are in the input dtype. Block sizes are data
(``TritonTuning``, frozen, passed in), not module globals.

Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before this module was
imported (the tests do that). Written for triton 3.6 (the GPU machine) and 3.9 (CI): only
``tl.dot(..., input_precision=)``, ``tl.trans``, ``tl.exp2`` / ``tl.log2``, ``tl.where`` and plain
loops/ifs are used. The interpreter of triton 3.9 multiplies bf16 ``tl.dot`` operands wrongly
(wrong values, no error), so on CPU tensors bf16 dots are upcast to fp32 (``UPCAST``); on CUDA
they are native bf16 tensor-core dots.

Shape legend: B batch, P query heads of a call, G key/value heads, M gathered rows per head,
S key positions (cache + new), H heads of a decode step, hd head width, n flattened rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["TritonTuning", "default_tuning", "cuda_tuning", "rows_attention", "decode_attention", "gather_matmul",
           "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class TritonTuning:
    """Block sizes and launch settings (one frozen object per device / head width; see
    ``default_tuning``). Blocks must be powers of two >= 16 (``tl.dot``'s minimum)."""

    block_m: int = 64  # query rows per program, forward and dq
    block_n: int = 64  # keys per inner step, forward and dq
    bwd_block_m: int = 32  # query rows per inner step of the dk/dv kernel
    bwd_block_n: int = 64  # keys per program of the dk/dv kernel
    dq_block_m: int = 64  # query rows per program of the dq kernel
    dq_block_n: int = 32  # keys per inner step of the dq kernel
    num_warps: int = 4
    num_stages: int = 2
    bwd_num_warps: int = 4
    bwd_num_stages: int = 2
    decode_block_n: int = 64  # keys per inner step of a decode split
    decode_min_keys: int = 256  # at least this many keys per split
    decode_programs: int = 1056  # aim for this many split programs (8 x 132 SMs of an H200)
    decode_num_warps: int = 4
    decode_num_stages: int = 3
    mm_block_m: int = 64  # gather_matmul rows per program
    mm_block_n: int = 64  # gather_matmul output columns per program
    mm_block_k: int = 64  # gather_matmul reduction step
    fp32_precision: str = "ieee"  # tl.dot of fp32 inputs: "ieee" (exact, slow) or "tf32"

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "bwd_block_m", "bwd_block_n", "dq_block_m", "dq_block_n",
                     "decode_block_n", "mm_block_m", "mm_block_n", "mm_block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"TritonTuning.{name}={value} must be a power of two >= 16")
        if self.fp32_precision not in ("ieee", "tf32", "tf32x3"):
            raise ValueError(f"TritonTuning.fp32_precision={self.fp32_precision!r}: use 'ieee', 'tf32' or 'tf32x3'")


def default_tuning(device: torch.device, head_dim: int, dtype: torch.dtype) -> TritonTuning:
    """Settings for ``device``: on CUDA the decode split count follows the SM count, and wide
    heads use smaller blocks (register / shared-memory budget). Untuned guesses for Hopper until
    ``benchmarks/gpu/run_gpu_checks.sh`` has been run; on CPU (interpreter) small blocks."""
    if device.type != "cuda":
        return TritonTuning(block_m=16, block_n=16, bwd_block_m=16, bwd_block_n=16, dq_block_m=16, dq_block_n=16,
                            decode_block_n=16, decode_min_keys=16, decode_programs=8,
                            mm_block_m=16, mm_block_n=16, mm_block_k=16)
    return cuda_tuning(head_dim, dtype, torch.cuda.get_device_properties(device).multi_processor_count)


def cuda_tuning(head_dim: int, dtype: torch.dtype, sms: int) -> TritonTuning:
    """The CUDA settings for a GPU with ``sms`` multiprocessors (``default_tuning`` on CUDA)."""
    if head_dim > 128 or (head_dim > 64 and dtype == torch.float32):  # register / shared-memory budget
        return TritonTuning(block_m=64, block_n=32, bwd_block_m=16, bwd_block_n=32, dq_block_m=32, dq_block_n=32,
                            num_warps=8 if head_dim > 128 else 4, bwd_num_warps=8 if head_dim > 128 else 4,
                            decode_programs=8 * sms)
    # forward as FlashAttention-2 kernels for hd = 128 on Hopper (128 rows x 64 keys, 8 warps); the
    # backward tiles of triton's fused-attention tutorial (hd = 64) halved for hd = 128, since dk/dv
    # (or dq) accumulate in registers: 64 keys x 32 rows per step, dq 64 rows x 32 keys
    return TritonTuning(
        block_m=128, block_n=64, num_warps=8, num_stages=3,
        bwd_block_m=32, bwd_block_n=64, dq_block_m=64, dq_block_n=32, bwd_num_warps=4, bwd_num_stages=2,
        decode_programs=8 * sms,
        mm_block_m=128, mm_block_n=128, mm_block_k=64,  # one program covers a head's 128 outputs: rows read once
    )


# ------------------------------------------------------------------------------------------------
# shared helpers


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation; UPCAST: fp32 operands (the interpreter's bf16 workaround)."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


def _check_head_dim(hd: int) -> int:
    """The padded head width (a power of two >= 16) for ``hd``, or a ValueError naming it."""
    if not 1 <= hd <= MAX_HEAD_DIM:
        raise ValueError(f"triton kernels support head widths 1..{MAX_HEAD_DIM}, got hd={hd}")
    return max(16, triton.next_power_of_2(hd))


def _check_device(*tensors: Tensor) -> None:
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {t.device} and {dev}")
    if dev.type != "cuda" and not _interpreting():
        raise ValueError(f"triton kernels need CUDA tensors (or TRITON_INTERPRET=1 at import), got {dev}")


def _interpreting() -> bool:
    """Whether the kernels were decorated for triton's CPU interpreter (decided at import)."""
    return type(_rows_fwd).__name__ == "InterpretedFunction"


def _dtypes(*tensors: Tensor) -> None:
    dt = tensors[0].dtype
    if dt not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"triton kernels take fp16, bf16 or fp32, got {dt}")
    for t in tensors:
        if t.dtype != dt:
            raise ValueError(f"dtypes differ: {t.dtype} vs {dt}")


def _precision(dtype: torch.dtype, device: torch.device, tuning: TritonTuning) -> tuple[str, bool]:
    """(input_precision, upcast) of the kernels' dots for ``dtype`` on ``device``; the precision
    only matters for fp32 operands (for 16-bit ones triton's default is passed)."""
    prec = tuning.fp32_precision if dtype == torch.float32 else "tf32"
    return prec, (dtype == torch.bfloat16 and device.type != "cuda")


def _mask_bytes(key_mask: Optional[Tensor], B: int, S: int, dummy: Tensor) -> tuple[Tensor, int, int]:
    """key_mask (B, S) bool as a uint8 view and its strides; ``dummy`` and zero strides if None."""
    if key_mask is None:
        return dummy, 0, 0
    if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, S):
        raise ValueError(f"key_mask must be bool (B, S) = ({B}, {S}), got {key_mask.dtype} {tuple(key_mask.shape)}")
    km = key_mask.view(torch.uint8)
    return km, km.stride(0), km.stride(1)


# ------------------------------------------------------------------------------------------------
# rows_attention: forward


@triton.jit
def _load_keys(base, keys, dims, s_s, s_d, key_ok, d_ok, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """A (BLOCK_N, BLOCK_D) tile of keys or values; no mask at all in whole blocks of full width."""
    ptrs = base + keys[:, None] * s_s + dims[None, :] * s_d
    if MASKED:
        tile = tl.load(ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return tile


@triton.jit
def _rows_fwd_step(acc, l_i, m_i, q, k_base, v_base, km_base, start, qpos, S, sk_s, sk_d, sv_s, sv_d, skm_s,
                   qk_scale, dims, d_ok,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr,
                   BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One key block of the online softmax. MASKED: the block may reach past S or past some
    row's own key index (a diagonal or last block); unmasked blocks skip those comparisons."""
    keys = start + tl.arange(0, BLOCK_N)
    key_ok = keys < S
    k = _load_keys(k_base, keys, dims, sk_s, sk_d, key_ok, d_ok, MASKED, EVEN_D)
    s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    if MASKED:
        allowed = key_ok[None, :]
        if CAUSAL:
            allowed = allowed & (keys[None, :] <= qpos[:, None])
        s = tl.where(allowed, s, float("-inf"))
    if HAS_KMASK:
        km = tl.load(km_base + keys * skm_s, mask=key_ok, other=0) != 0
        s = tl.where(km[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no allowed key yet: no NaN
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_keys(v_base, keys, dims, sv_s, sv_d, key_ok, d_ok, MASKED, EVEN_D)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
    return acc, l_i, m_new


@triton.jit
def _key_range(qpos, row_ok, S, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full_end, hi): keys [0, full_end) are visible to every row of the block (whole key blocks,
    no mask needed); keys [full_end, hi) need the mask; keys >= hi are seen by no row."""
    if CAUSAL:
        hi = tl.minimum(tl.max(qpos, 0) + 1, S)
        lo = tl.min(tl.where(row_ok, qpos, S), 0) + 1  # dead rows (qpos < 0) give lo <= 0
        full_end = (tl.maximum(tl.minimum(lo, hi), 0) // BLOCK_N) * BLOCK_N
        hi = tl.maximum(hi, 0)
    else:
        hi = S
        full_end = (S // BLOCK_N) * BLOCK_N
    return full_end, hi


@triton.jit
def _rows_fwd(Q, K, V, QPOS, KVH, KM, O, LSE,
              sq_b, sq_p, sq_m, sq_d, sk_b, sk_g, sk_s, sk_d, sv_b, sv_g, sv_s, sv_d,
              sp_b, sp_p, sp_m, skm_b, skm_s, so_b, so_p, so_m, so_d,
              P, M, S, qk_scale, HD: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One program: BLOCK_M rows of query head p of item b, against all keys of KV head
    KVH[p] (up to the block's largest qpos when causal). Writes O and the rows' log2-sum-exp
    (+inf for rows with no allowed key, so the backward's probabilities are 0 there)."""
    mb = tl.cdiv(M, BLOCK_M) - 1 - tl.program_id(0)  # latest (costliest causal) blocks first
    bp = tl.program_id(1)
    b = (bp // P).to(tl.int64)
    p = bp % P
    g = tl.load(KVH + p).to(tl.int64)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    d_ok = dims < HD
    q = tl.load(Q + b * sq_b + p * sq_p + rows[:, None] * sq_m + dims[None, :] * sq_d,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qpos = tl.load(QPOS + b * sp_b + p * sp_p + rows * sp_m, mask=row_ok, other=-1)
    k_base = K + b * sk_b + g * sk_g
    v_base = V + b * sv_b + g * sv_g
    km_base = KM + b * skm_b
    full_end, hi = _key_range(qpos, row_ok, S, CAUSAL, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _rows_fwd_step(acc, l_i, m_i, q, k_base, v_base, km_base, start, qpos, S, sk_s, sk_d,
                                       sv_s, sv_d, skm_s, qk_scale, dims, d_ok,
                                       False, CAUSAL, HAS_KMASK, BLOCK_N, BLOCK_D == HD, PREC, UPCAST)
    for start in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = _rows_fwd_step(acc, l_i, m_i, q, k_base, v_base, km_base, start, qpos, S, sk_s, sk_d,
                                       sv_s, sv_d, skm_s, qk_scale, dims, d_ok,
                                       True, CAUSAL, HAS_KMASK, BLOCK_N, BLOCK_D == HD, PREC, UPCAST)
    alive = l_i > 0
    out = acc / tl.where(alive, l_i, 1.0)[:, None]  # dead rows: acc is 0, so 0
    tl.store(O + b * so_b + p * so_p + rows[:, None] * so_m + dims[None, :] * so_d, out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(alive, m_i + tl.log2(tl.where(alive, l_i, 1.0)), float("inf"))
    tl.store(LSE + (b * P + p) * M + rows, lse, mask=row_ok)


# ------------------------------------------------------------------------------------------------
# rows_attention: backward (FlashAttention-2 style, from the saved log2-sum-exp)


@triton.jit
def _rows_dq_step(dq, q, do, lse, delta, k_base, v_base, km_base, start, qpos, S, sk_s, sk_d, sv_s, sv_d, skm_s,
                  qk_scale, dims, d_ok,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr,
                  BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    keys = start + tl.arange(0, BLOCK_N)
    key_ok = keys < S
    k = _load_keys(k_base, keys, dims, sk_s, sk_d, key_ok, d_ok, MASKED, EVEN_D)
    v = _load_keys(v_base, keys, dims, sv_s, sv_d, key_ok, d_ok, MASKED, EVEN_D)
    s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
    if MASKED:
        allowed = key_ok[None, :]
        if CAUSAL:
            allowed = allowed & (keys[None, :] <= qpos[:, None])
        s = tl.where(allowed, s, float("-inf"))
    if HAS_KMASK:
        km = tl.load(km_base + keys * skm_s, mask=key_ok, other=0) != 0
        s = tl.where(km[None, :], s, float("-inf"))
    p = tl.exp2(s - lse[:, None])  # masked keys and dead rows (lse = +inf): 0
    dp = _dot(do, tl.trans(v), PREC, UPCAST)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, PREC, UPCAST)


@triton.jit
def _rows_bwd_dq(Q, K, V, QPOS, KVH, KM, DO, LSE, DELTA, DQ,
                 sq_b, sq_p, sq_m, sq_d, sk_b, sk_g, sk_s, sk_d, sv_b, sv_g, sv_s, sv_d,
                 sp_b, sp_p, sp_m, skm_b, skm_s, sdo_b, sdo_p, sdo_m, sdo_d,
                 P, M, S, qk_scale, scale, HD: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dq of BLOCK_M rows (the forward's grid and key range); DQ is contiguous (B, P, M, hd)."""
    mb = tl.cdiv(M, BLOCK_M) - 1 - tl.program_id(0)
    bp = tl.program_id(1)
    b = (bp // P).to(tl.int64)
    p = bp % P
    g = tl.load(KVH + p).to(tl.int64)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    d_ok = dims < HD
    rd_ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sq_b + p * sq_p + rows[:, None] * sq_m + dims[None, :] * sq_d, mask=rd_ok, other=0.0)
    do = tl.load(DO + b * sdo_b + p * sdo_p + rows[:, None] * sdo_m + dims[None, :] * sdo_d, mask=rd_ok, other=0.0)
    qpos = tl.load(QPOS + b * sp_b + p * sp_p + rows * sp_m, mask=row_ok, other=-1)
    lse = tl.load(LSE + (b * P + p) * M + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + (b * P + p) * M + rows, mask=row_ok, other=0.0)
    k_base = K + b * sk_b + g * sk_g
    v_base = V + b * sv_b + g * sv_g
    km_base = KM + b * skm_b
    full_end, hi = _key_range(qpos, row_ok, S, CAUSAL, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, full_end, BLOCK_N):
        dq = _rows_dq_step(dq, q, do, lse, delta, k_base, v_base, km_base, start, qpos, S, sk_s, sk_d, sv_s, sv_d,
                           skm_s, qk_scale, dims, d_ok,
                           False, CAUSAL, HAS_KMASK, BLOCK_N, BLOCK_D == HD, PREC, UPCAST)
    for start in range(full_end, hi, BLOCK_N):
        dq = _rows_dq_step(dq, q, do, lse, delta, k_base, v_base, km_base, start, qpos, S, sk_s, sk_d, sv_s, sv_d,
                           skm_s, qk_scale, dims, d_ok,
                           True, CAUSAL, HAS_KMASK, BLOCK_N, BLOCK_D == HD, PREC, UPCAST)
    dq = dq * scale
    tl.store(DQ + ((b * P + p) * M + rows[:, None]) * HD + dims[None, :], dq.to(DQ.dtype.element_ty), mask=rd_ok)


@triton.jit
def _rows_bwd_dkdv(Q, K, V, QPOS, KVH, KM, DO, LSE, DELTA, DK, DV,
                   sq_b, sq_p, sq_m, sq_d, sk_b, sk_g, sk_s, sk_d, sv_b, sv_g, sv_s, sv_d,
                   sp_b, sp_p, sp_m, skm_b, skm_s, sdo_b, sdo_p, sdo_m, sdo_d,
                   P, G, M, S, qk_scale, scale, HD: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dk, dv of BLOCK_N keys of KV head g of item b: one program owns them and loops over every
    query head reading g and over its row blocks, so the sum over heads needs no atomics and is
    deterministic. Causal: row blocks whose largest qpos is before the key block are skipped.
    DK, DV are contiguous (B, G, S, hd)."""
    nb = tl.program_id(0)
    bg = tl.program_id(1)
    b = (bg // G).to(tl.int64)
    g = bg % G
    keys = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < S
    d_ok = dims < HD
    kd_ok = key_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * sk_b + g * sk_g + keys[:, None] * sk_s + dims[None, :] * sk_d, mask=kd_ok, other=0.0)
    v = tl.load(V + b * sv_b + g * sv_g + keys[:, None] * sv_s + dims[None, :] * sv_d, mask=kd_ok, other=0.0)
    allowed_k = key_ok
    if HAS_KMASK:
        allowed_k = allowed_k & (tl.load(KM + b * skm_b + keys * skm_s, mask=key_ok, other=0) != 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    first_key = nb * BLOCK_N
    for p in range(0, P):
        if tl.load(KVH + p) == g:
            for m0 in range(0, M, BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                row_ok = rows < M
                qpos = tl.load(QPOS + b * sp_b + p * sp_p + rows * sp_m, mask=row_ok, other=-1)
                if CAUSAL:
                    needed = tl.max(qpos, 0) >= first_key  # some row of the block sees these keys
                else:
                    needed = True
                if needed:
                    rd_ok = row_ok[:, None] & d_ok[None, :]
                    q = tl.load(Q + b * sq_b + p * sq_p + rows[:, None] * sq_m + dims[None, :] * sq_d,
                                mask=rd_ok, other=0.0)
                    do = tl.load(DO + b * sdo_b + p * sdo_p + rows[:, None] * sdo_m + dims[None, :] * sdo_d,
                                 mask=rd_ok, other=0.0)
                    lse = tl.load(LSE + (b * P + p) * M + rows, mask=row_ok, other=float("inf"))
                    delta = tl.load(DELTA + (b * P + p) * M + rows, mask=row_ok, other=0.0)
                    s_t = _dot(k, tl.trans(q), PREC, UPCAST) * qk_scale  # (BLOCK_N, BLOCK_M)
                    allowed = allowed_k[:, None]
                    if CAUSAL:
                        allowed = allowed & (keys[:, None] <= qpos[None, :])
                    s_t = tl.where(allowed, s_t, float("-inf"))
                    p_t = tl.exp2(s_t - lse[None, :])
                    dv += _dot(p_t.to(do.dtype), do, PREC, UPCAST)
                    dp_t = _dot(v, tl.trans(do), PREC, UPCAST)
                    ds_t = p_t * (dp_t - delta[None, :])
                    dk += _dot(ds_t.to(q.dtype), q, PREC, UPCAST)
    out = ((b * G + g) * S + keys[:, None]) * HD + dims[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kd_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kd_ok)


# ------------------------------------------------------------------------------------------------
# rows_attention: host side


def _strides4(t: Tensor) -> tuple[int, int, int, int]:
    s = t.stride()
    return s[0], s[1], s[2], s[3]


class _RowsAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, qpos, kv_head, key_mask, scale, causal, tuning):  # type: ignore[override]
        B, P, M, hd = q.shape
        S = k.shape[2]
        block_d = _check_head_dim(hd)
        prec, upcast = _precision(q.dtype, q.device, tuning)
        out = torch.empty(B, P, M, hd, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, P, M, dtype=torch.float32, device=q.device)
        km, skm_b, skm_s = _mask_bytes(key_mask, B, S, qpos)
        ctx.empty = M == 0 or S == 0 or B * P == 0  # nothing to launch: no rows, or no key (all 0)
        if ctx.empty:
            ctx.save_for_backward(q, k, v)
            return out.zero_()
        grid = (triton.cdiv(M, tuning.block_m), B * P)
        _rows_fwd[grid](
            q, k, v, qpos, kv_head, km, out, lse,
            *_strides4(q), *_strides4(k), *_strides4(v), *qpos.stride(), skm_b, skm_s, *_strides4(out),
            P, M, S, scale * _LOG2E, HD=hd,
            CAUSAL=causal, HAS_KMASK=key_mask is not None, BLOCK_M=tuning.block_m, BLOCK_N=tuning.block_n,
            BLOCK_D=block_d, PREC=prec, UPCAST=upcast, num_warps=tuning.num_warps, num_stages=tuning.num_stages,
        )
        ctx.save_for_backward(q, k, v, qpos, kv_head, km, out, lse)
        ctx.meta = (scale, causal, tuning, key_mask is not None, skm_b, skm_s)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):  # type: ignore[override]
        if ctx.empty:
            q, k, v = ctx.saved_tensors
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None, None, None, None, None, None
        q, k, v, qpos, kv_head, km, out, lse = ctx.saved_tensors
        scale, causal, tuning, has_kmask, skm_b, skm_s = ctx.meta
        B, P, M, hd = q.shape
        G, S = k.shape[1], k.shape[2]
        block_d = _check_head_dim(hd)
        prec, upcast = _precision(q.dtype, q.device, tuning)
        delta = (dout.float() * out.float()).sum(-1).contiguous()  # (B, P, M) rowsum(dO * O)
        common = dict(CAUSAL=causal, HAS_KMASK=has_kmask, BLOCK_D=block_d, PREC=prec, UPCAST=upcast,
                      num_warps=tuning.bwd_num_warps, num_stages=tuning.bwd_num_stages)
        strides = (*_strides4(q), *_strides4(k), *_strides4(v), *qpos.stride(), skm_b, skm_s, *_strides4(dout))
        dq = dk = dv = None
        if ctx.needs_input_grad[0]:
            dq = torch.empty(B, P, M, hd, dtype=q.dtype, device=q.device)
            _rows_bwd_dq[(triton.cdiv(M, tuning.dq_block_m), B * P)](
                q, k, v, qpos, kv_head, km, dout, lse, delta, dq, *strides, P, M, S, scale * _LOG2E, scale, HD=hd,
                BLOCK_M=tuning.dq_block_m, BLOCK_N=tuning.dq_block_n, **common,
            )
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dk = torch.empty(B, G, S, hd, dtype=k.dtype, device=k.device)
            dv = torch.empty(B, G, S, hd, dtype=v.dtype, device=v.device)
            _rows_bwd_dkdv[(triton.cdiv(S, tuning.bwd_block_n), B * G)](
                q, k, v, qpos, kv_head, km, dout, lse, delta, dk, dv, *strides, P, G, M, S,
                scale * _LOG2E, scale, HD=hd, BLOCK_M=tuning.bwd_block_m, BLOCK_N=tuning.bwd_block_n, **common,
            )
        return dq, dk, dv, None, None, None, None, None, None


def rows_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qpos: Optional[Tensor],
    kv_head: Tensor,
    *,
    scale: float,
    causal: bool,
    key_mask: Optional[Tensor] = None,
    tuning: Optional[TritonTuning] = None,
) -> Tensor:
    """softmax(q k^T * scale) v of gathered query rows, each against the keys of its head.

    q (B, P, M, hd): M rows of each of P query heads (any strides; padding rows allowed: give
    them any qpos, their output is finite and the caller gates it); k, v (B, G, S, hd): the keys
    and values of all S positions of the G KV heads (any strides, never copied per query head);
    kv_head (P,) int: the KV head query head p reads (grouped-query attention); qpos (B, P, M) int
    (None when not causal): the key index of each row. Causal: row attends keys j <= qpos; rows
    need not be contiguous nor sorted (a row block reads keys up to its largest qpos and needs no
    mask below its smallest, so ascending rows skip the most). key_mask (B, S) bool or None:
    True = may attend. Rows with no allowed key give exactly 0 (and zero gradients). fp32
    statistics; returns (B, P, M, hd) in q's dtype. Differentiable in q, k, v; the k/v gradient
    sums over the query heads sharing a KV head in a fixed order (deterministic, no atomics).
    """
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q must be (B, P, M, hd), k and v (B, G, S, hd); "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, P, M, hd = q.shape
    if k.shape[0] != B or k.shape[3] != hd:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} (batch, head width)")
    if (qpos is not None and tuple(qpos.shape) != (B, P, M)) or tuple(kv_head.shape) != (P,):
        raise ValueError(f"qpos must be (B, P, M) = {(B, P, M)} and kv_head (P,); "
                         f"got {tuple(qpos.shape)}, {tuple(kv_head.shape)}")
    _check_head_dim(hd)
    _dtypes(q, k, v)
    if qpos is None:
        if causal:
            raise ValueError("causal rows_attention needs qpos (the key index of every row)")
        qpos = torch.zeros(1, 1, 1, dtype=torch.int32, device=q.device).expand(B, P, M)  # unused
    _check_device(q, k, v, qpos, *([] if key_mask is None else [key_mask]))  # kv_head may be on the host
    if B * P > 65535:
        raise ValueError(f"B * P = {B * P} exceeds the launch grid's second axis (65535)")
    tuning = tuning or default_tuning(q.device, hd, q.dtype)
    if kv_head.device.type == "cpu" and P and not (0 <= int(kv_head.min()) and int(kv_head.max()) < k.shape[1]):
        raise ValueError(f"kv_head must index the G={k.shape[1]} KV heads, got {kv_head.tolist()}")
    qpos = qpos.to(torch.int32)
    kv_head = kv_head.to(device=q.device, dtype=torch.int32).contiguous()
    return _RowsAttention.apply(q, k, v, qpos, kv_head, key_mask, float(scale), bool(causal), tuning)


# ------------------------------------------------------------------------------------------------
# decode_attention


@triton.jit
def _decode_split(Q, K, V, ACT, LEN, KM, OPART, LPART,
                  sq_b, sq_h, sq_d, sk_b, sk_g, sk_s, sk_d, sv_b, sv_g, sv_s, sv_d, sa_b, sa_h, skm_b, skm_s,
                  H, G, R, S, chunk, NS, qk_scale, HD: tl.constexpr,
                  R_PAD: tl.constexpr, USE_DOT: tl.constexpr, HAS_LEN: tl.constexpr, HAS_KMASK: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Split ``pid0`` (keys [pid0 * chunk, +chunk)) of KV head g of item b for the R query heads
    reading it: the cache is read once for all of them, and not at all if none is active.
    Writes each active head's partial output (normalised) and log2-sum-exp (-inf: no key)."""
    split = tl.program_id(0)
    bg = tl.program_id(1)
    b = (bg // G).to(tl.int64)
    g = bg % G
    r = tl.arange(0, R_PAD)
    heads = g * R + r
    head_ok = r < R
    act = (tl.load(ACT + b * sa_b + heads * sa_h, mask=head_ok, other=0) != 0) & head_ok
    if tl.max(act.to(tl.int32), 0) > 0:
        dims = tl.arange(0, BLOCK_D)
        d_ok = dims < HD
        q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + dims[None, :] * sq_d,
                    mask=act[:, None] & d_ok[None, :], other=0.0)  # (R_PAD, BLOCK_D)
        q1 = tl.sum(q.to(tl.float32), 0)  # (BLOCK_D,): the one head when R_PAD = 1
        start = split * chunk
        end = tl.minimum(start + chunk, S)
        if HAS_LEN:
            end = tl.minimum(end, tl.load(LEN + b))
        k_base = K + b * sk_b + g.to(tl.int64) * sk_g
        v_base = V + b * sv_b + g.to(tl.int64) * sv_g
        m_i = tl.full([R_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([R_PAD], tl.float32)
        acc = tl.zeros([R_PAD, BLOCK_D], tl.float32)
        for n in range(start, end, BLOCK_N):
            keys = n + tl.arange(0, BLOCK_N)
            key_ok = keys < end
            kv_ok = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + keys[:, None] * sk_s + dims[None, :] * sk_d, mask=kv_ok, other=0.0)
            v = tl.load(v_base + keys[:, None] * sv_s + dims[None, :] * sv_d, mask=kv_ok, other=0.0)
            if USE_DOT:
                s = _dot(q, tl.trans(k), PREC, UPCAST)
            else:  # one head per KV head (R_PAD = 1): a row times the tile (memory bound anyway)
                s = tl.sum(q1[None, :] * k.to(tl.float32), 1)[None, :]
            s = s * qk_scale  # (R_PAD, BLOCK_N)
            allowed = key_ok
            if HAS_KMASK:
                allowed = allowed & (tl.load(KM + b * skm_b + keys * skm_s, mask=key_ok, other=0) != 0)
            s = tl.where(allowed[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_ref[:, None])
            alpha = tl.exp2(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, 1)
            if USE_DOT:
                pv = _dot(p.to(v.dtype), v, PREC, UPCAST)
            else:
                pv = tl.sum(tl.sum(p, 0)[:, None] * v.to(tl.float32), 0)[None, :]
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        alive = l_i > 0
        out = acc / tl.where(alive, l_i, 1.0)[:, None]
        lse = tl.where(alive, m_i + tl.log2(tl.where(alive, l_i, 1.0)), float("-inf"))
        row = (b * H + heads) * NS + split  # (R_PAD,) into (B, H, NS)
        tl.store(OPART + row[:, None] * BLOCK_D + dims[None, :], out, mask=act[:, None])
        tl.store(LPART + row, lse, mask=act)


@triton.jit
def _decode_merge(OPART, LPART, ACT, O, sa_b, sa_h, so_b, so_h, so_d, H, NS, HD: tl.constexpr,
                  NS_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the splits of head h of item b by their log-sum-exps; inactive heads (and heads with
    no allowed key) write 0 and read nothing."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HD
    act = tl.load(ACT + b * sa_b + h * sa_h) != 0
    splits = tl.arange(0, NS_PAD)
    sp_ok = splits < tl.where(act, NS, 0)  # nothing read for an inactive head
    row = bh.to(tl.int64) * NS + splits
    lse = tl.load(LPART + row, mask=sp_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_ref)  # (NS_PAD,)
    part = tl.load(OPART + row[:, None] * BLOCK_D + dims[None, :], mask=sp_ok[:, None], other=0.0)
    num = tl.sum(w[:, None] * part, 0)
    den = tl.sum(w, 0)
    out = num / tl.where(den > 0, den, 1.0)
    tl.store(O + b.to(tl.int64) * so_b + h * so_h + dims * so_d, out.to(O.dtype.element_ty), mask=d_ok)


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    active: Tensor,
    *,
    scale: float,
    lengths: Optional[Tensor] = None,
    key_mask: Optional[Tensor] = None,
    tuning: Optional[TritonTuning] = None,
) -> Tensor:
    """Attention of one new query per sequence, only for the active heads (forward only).

    q (B, H, hd); k_cache, v_cache (B, G, S, hd), any strides (views into a larger preallocated
    cache are read in place); query head h reads KV head h // (H // G). active (B, H) bool: an
    inactive head outputs 0 and its KV is not read (a KV head none of its query heads uses is not
    read at all). lengths (B,) int: keys [0, lengths[b]) may be attended (the rest not read);
    key_mask (B, S) bool: True = may attend; both optional, combined. A head with no allowed key
    gives 0. Split-K: each (item, KV head) is cut into key ranges processed by separate programs
    (enough to fill the GPU: ``tuning.decode_programs``), merged by log-sum-exp. Returns (B, H, hd)
    in q's dtype.
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q must be (B, H, hd), caches (B, G, S, hd); "
                         f"got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, H, hd = q.shape
    G, S = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != B or k_cache.shape[3] != hd or H % G:
        raise ValueError(f"caches {tuple(k_cache.shape)} do not fit q {tuple(q.shape)} (batch, head width, H % G == 0)")
    if active.dtype != torch.bool or tuple(active.shape) != (B, H):
        raise ValueError(f"active must be bool (B, H) = ({B}, {H}), got {active.dtype} {tuple(active.shape)}")
    block_d = _check_head_dim(hd)
    _dtypes(q, k_cache, v_cache)
    extra = [t for t in (lengths, key_mask) if t is not None]
    _check_device(q, k_cache, v_cache, active, *extra)
    tuning = tuning or default_tuning(q.device, hd, q.dtype)
    R = H // G
    out = torch.empty(B, H, hd, dtype=q.dtype, device=q.device)
    if B == 0 or H == 0:
        return out
    block_n = tuning.decode_block_n
    ns = max(1, min(triton.cdiv(tuning.decode_programs, B * G), triton.cdiv(S, max(tuning.decode_min_keys, block_n))))
    chunk = triton.cdiv(triton.cdiv(max(S, 1), ns), block_n) * block_n
    ns = triton.cdiv(max(S, 1), chunk)
    r_pad = 1 if R == 1 else max(16, triton.next_power_of_2(R))  # several heads per KV head: tl.dot
    opart = torch.empty(B, H, ns, block_d, dtype=torch.float32, device=q.device)
    lpart = torch.empty(B, H, ns, dtype=torch.float32, device=q.device)
    act = active.view(torch.uint8)
    if lengths is not None:
        if tuple(lengths.shape) != (B,):
            raise ValueError(f"lengths must be (B,) = ({B},), got {tuple(lengths.shape)}")
        lengths = lengths.to(torch.int32).contiguous()
    km, skm_b, skm_s = _mask_bytes(key_mask, B, S, act)
    prec, upcast = _precision(q.dtype, q.device, tuning)
    _decode_split[(ns, B * G)](
        q, k_cache, v_cache, act, act if lengths is None else lengths, km, opart, lpart,
        *q.stride(), *_strides4(k_cache), *_strides4(v_cache), *act.stride(), skm_b, skm_s,
        H, G, R, S, chunk, ns, scale * _LOG2E, HD=hd,
        R_PAD=r_pad, USE_DOT=R > 1, HAS_LEN=lengths is not None, HAS_KMASK=key_mask is not None,
        BLOCK_N=block_n, BLOCK_D=block_d, PREC=prec, UPCAST=upcast, num_warps=tuning.decode_num_warps,
        num_stages=tuning.decode_num_stages,
    )
    _decode_merge[(B * H,)](
        opart, lpart, act, out, *act.stride(), *out.stride(), H, ns, HD=hd,
        NS_PAD=max(2, triton.next_power_of_2(ns)), BLOCK_D=block_d, num_warps=4,
    )
    return out


# ------------------------------------------------------------------------------------------------
# gather_matmul: x[rows] @ w[p] without materialising x[rows]


@triton.jit
def _gather_mm(X, ROWS, W, Y, sx_n, sx_d, sr_b, sr_p, sr_m, sw_p, sw_d, sw_o,
               P, M, D, O,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Y[b, p, m, :] = X[ROWS[b, p, m]] @ W[p], one (BLOCK_M rows, BLOCK_N columns) tile per
    program; Y contiguous (B, P, M, O)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bp = tl.program_id(2)
    b = bp // P
    p = bp % P
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < O
    src = tl.load(ROWS + b * sr_b + p * sr_p + rows * sr_m, mask=row_ok, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_base = W + p.to(tl.int64) * sw_p
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        x = tl.load(X + src[:, None] * sx_n + ks[None, :] * sx_d, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + ks[:, None] * sw_d + cols[None, :] * sw_o, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += _dot(x, w, PREC, UPCAST)
    out = (bp.to(tl.int64) * M + rows[:, None]) * O + cols[None, :]
    tl.store(Y + out, acc.to(Y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gather_mm_dw(X, ROWS, DY, DW, sx_n, sx_d, sr_b, sr_p, sr_m, B, P, M, D, O,
                  BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_M: tl.constexpr,
                  PREC: tl.constexpr, UPCAST: tl.constexpr):
    """DW[p] = sum over b, m of X[ROWS[b, p, m]]^T DY[b, p, m] (a (BLOCK_D, BLOCK_O) tile per
    program, reduced over all B * M rows in order: deterministic); DY contiguous (B, P, M, O),
    DW contiguous fp32 (P, D, O)."""
    pid_d = tl.program_id(0)
    pid_o = tl.program_id(1)
    p = tl.program_id(2)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    os_ = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    d_ok = ds < D
    o_ok = os_ < O
    acc = tl.zeros([BLOCK_D, BLOCK_O], tl.float32)
    for b in range(0, B):
        for m0 in range(0, M, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            src = tl.load(ROWS + b * sr_b + p * sr_p + rows * sr_m, mask=row_ok, other=0).to(tl.int64)
            x = tl.load(X + src[:, None] * sx_n + ds[None, :] * sx_d, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            dy = tl.load(DY + ((b * P + p).to(tl.int64) * M + rows[:, None]) * O + os_[None, :],
                         mask=row_ok[:, None] & o_ok[None, :], other=0.0)
            acc += _dot(tl.trans(x), dy, PREC, UPCAST)
    tl.store(DW + (p.to(tl.int64) * D + ds[:, None]) * O + os_[None, :], acc, mask=d_ok[:, None] & o_ok[None, :])


class _GatherMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rows, w, tuning):  # type: ignore[override]
        B, P, M = rows.shape
        D, O = w.shape[1], w.shape[2]
        y = torch.empty(B, P, M, O, dtype=x.dtype, device=x.device)
        prec, upcast = _precision(x.dtype, x.device, tuning)
        grid = (triton.cdiv(M, tuning.mm_block_m), triton.cdiv(O, tuning.mm_block_n), B * P)
        _gather_mm[grid](x, rows, w, y, *x.stride(), *rows.stride(), *w.stride(), P, M, D, O,
                         BLOCK_M=tuning.mm_block_m, BLOCK_N=tuning.mm_block_n, BLOCK_K=tuning.mm_block_k,
                         PREC=prec, UPCAST=upcast, num_warps=tuning.num_warps, num_stages=tuning.num_stages)
        ctx.save_for_backward(x, rows, w)
        ctx.tuning = tuning
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        x, rows, w = ctx.saved_tensors
        tuning = ctx.tuning
        B, P, M = rows.shape
        D, O = w.shape[1], w.shape[2]
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:  # a scatter-add over rows (torch: the rows of a token are spread)
            dx_rows = (dy @ w.transpose(1, 2)).reshape(-1, D)
            dx = torch.zeros_like(x).index_add_(0, rows.reshape(-1).long(), dx_rows)
        if ctx.needs_input_grad[2]:
            prec, upcast = _precision(x.dtype, x.device, tuning)
            dw32 = torch.empty(P, D, O, dtype=torch.float32, device=x.device)
            grid = (triton.cdiv(D, tuning.mm_block_m), triton.cdiv(O, tuning.mm_block_n), P)
            _gather_mm_dw[grid](x, rows, dy, dw32, *x.stride(), *rows.stride(), B, P, M, D, O,
                                BLOCK_D=tuning.mm_block_m, BLOCK_O=tuning.mm_block_n, BLOCK_M=tuning.mm_block_k,
                                PREC=prec, UPCAST=upcast, num_warps=tuning.num_warps, num_stages=tuning.num_stages)
            dw = dw32.to(w.dtype)
        return dx, None, dw, None


def gather_matmul(x: Tensor, rows: Tensor, w: Tensor, *, tuning: Optional[TritonTuning] = None) -> Tensor:
    """``x[rows[b, p, m]] @ w[p]`` without the gathered copy of x: x (n, D) (any strides),
    rows (B, P, M) int indices into n, w (P, D, O) -> (B, P, M, O) in x's dtype, fp32
    accumulation. Same values and gradients as ``moh.layers.gather.gather_bmm``; the x gradient is
    torch's scatter-add, the w gradient a Triton kernel that gathers the rows again."""
    if x.dim() != 2 or rows.dim() != 3 or w.dim() != 3 or w.shape[0] != rows.shape[1] or w.shape[1] != x.shape[1]:
        raise ValueError(f"x must be (n, D), rows (B, P, M), w (P, D, O); "
                         f"got {tuple(x.shape)}, {tuple(rows.shape)}, {tuple(w.shape)}")
    _dtypes(x, w)
    _check_device(x, rows, w)
    B, P, M = rows.shape
    if B * P > 65535:
        raise ValueError(f"B * P = {B * P} exceeds the launch grid's third axis (65535)")
    tuning = tuning or default_tuning(x.device, w.shape[2], x.dtype)
    return _GatherMatmul.apply(x, rows.to(torch.int32), w, tuning)
