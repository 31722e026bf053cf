"""moh's own CPU kernels (``csrc/cpu_kernels.cpp``): causal attention of gathered rows
(:func:`rows_attention`), one decode step of one sequence for its active heads only
(:func:`decode_token`), the two-stage router for a few tokens
(:func:`two_stage_router`), and the per-head products of gathered rows (:func:`scatter_mm`,
:func:`gather_mm`: the sparse backend's query and output projections and their gradients).

Rows: torch's CPU kernels run gathered causal rows at about half the rate of a whole causal head: a
row's keys end at its own position, so no single call covers many rows (RESULTS.md, issue 11).
This kernel takes blocks of up to ``qblock`` rows at once, reads the keys every row of the block
sees in chunks without a mask and the diagonal keys in short chunks with only the rows that see
them, and keeps an online softmax per row (no score matrix is written out); the products are
the process's BLAS ``sgemm`` (torch's MKL). Forward and backward; fp32 CPU tensors.

Decode: a step of one sequence is a few small products; built from torch operations it costs
~150 of them per layer, each a few microseconds, and reads every head's query and output weights.
Here the active heads' query rows of W_Q, their KV cache (in place) and their columns of W_O are
read in one call (BLAS ``sgemv`` per head, qk-norm and RoPE of the query in between; inference
only: no backward).

Projections of gathered rows: with torch's operations each head's rows are gathered, multiplied
and (output projection) added back with ``index_add_``, one pass over the (n, D) rows per head.
Here the rows are taken a block at a time and every head's rows in the block are read from it
or added to it while it is in cache, the products and weight gradients being moh's register
tiles on the rows where they lie (``tiles=True``; or ``sgemm`` on gathered copies of at most
``mblock`` rows) (N=2048, 50% heads, 1 thread: forward 89% of ideal against 85% with torch's
operations).

The C++ source is compiled on first use with the system C++ compiler (``$CXX``, else ``g++``;
about one second) against torch's own libraries, into a cache directory keyed by the source,
the flags, the compiler and the CPU (``$MOH_KERNEL_CACHE``, else ``~/.cache/moh/kernels``; a
per-user temporary directory if that is not writable);
the shared library is written to a temporary name and renamed, so a concurrent or interrupted
build never leaves a partial file. Without a compiler, with a failed build, or with
``MOH_CPU_KERNEL=0`` :func:`available` is False and the sparse backend and the router use
torch's operations (for causal rows ``moh.backends.sparse.kernels.causal_flash``); one
RuntimeWarning says so and :func:`build_error` says why.

Shape legend: B batch, P heads, M rows per head, S key positions, hd head width.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
ABI = 10  # moh_rows_abi() of the source this module speaks to

_lib: Optional[ctypes.CDLL] = None
_error: Optional[str] = None
_tried = False


def cache_dir() -> Path:
    return Path(os.environ.get("MOH_KERNEL_CACHE") or Path.home() / ".cache" / "moh" / "kernels")


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and flags (a library built on another
    CPU of a shared home directory must not be loaded here)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "g++"))


def _build() -> ctypes.CDLL:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'g++')!r} not on PATH)")
    torch_lib = Path(torch.__file__).parent / "lib"
    if not any(torch_lib.glob("libtorch_cpu.*")):
        raise RuntimeError(f"torch's libtorch_cpu not found in {torch_lib}")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    link = [f"-L{torch_lib}", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, *link, *version, _cpu_id(), torch.__version__])
                         .encode()).hexdigest()[:16]
    name = f"cpu_kernels-{key}.so"
    target = cache_dir() / name
    fallback = Path(tempfile.gettempdir()) / f"moh-kernels-{os.getuid()}" / name
    if not target.exists() and fallback.exists():
        target = fallback
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(target.parent, os.W_OK):
                raise PermissionError(f"{target.parent} is not writable")
        except OSError:  # e.g. a read-only home directory: a per-user temporary directory
            target = fallback
            target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp, *link], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{cxx} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    if lib.moh_rows_abi() != ABI:
        raise RuntimeError(f"{target} speaks ABI {lib.moh_rows_abi()}, expected {ABI}")
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.moh_rows_forward.restype = None
    lib.moh_rows_forward.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, ptr, i64, ptr, ptr, ptr,
                                     i64, i64, i64, f32, i64, i64, i64, ctypes.c_int]
    lib.moh_rows_backward.restype = None
    lib.moh_rows_backward.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, ptr, i64, ptr, ptr, ptr, ptr,
                                      ptr, ptr, ptr, i64, i64, i64, i64, f32, i64, i64, i64, ctypes.c_int]
    lib.moh_two_stage_router.restype = None
    lib.moh_two_stage_router.argtypes = [ptr, i64, i64, ptr, i64, ptr, i64, ptr, i64, ptr, i64, ptr, ptr, ptr,
                                         ctypes.c_int]
    lib.moh_scatter_mm.restype = None
    lib.moh_scatter_mm.argtypes = [ptr, i64, i64, i64, *[ptr] * 10, ctypes.c_int, i64, i64, ctypes.c_int,
                                   ctypes.c_int]
    lib.moh_gather_mm.restype = None
    lib.moh_gather_mm.argtypes = [ptr, i64, i64, i64, *[ptr] * 13, i64, i64, ctypes.c_int, ctypes.c_int]
    lib.moh_head_rows.restype = None
    lib.moh_head_rows.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, i64, i64, ptr, i64, i64, ptr, ptr, ptr, ptr,
                                  ptr, ptr, ctypes.c_int]
    lib.moh_decode_token.restype = None
    lib.moh_decode_token.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, ptr, ptr, i64, i64, i64, ptr, f32, ptr, ptr,
                                     ptr, i64, i64, ptr, i64, i64, i64, ptr, f32, ptr, i64, ptr, i64, ptr,
                                     ctypes.c_int]
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, built on first call; None if it cannot be (see build_error)."""
    global _lib, _error, _tried
    if not _tried:
        _tried = True
        if os.environ.get("MOH_CPU_KERNEL", "1") == "0":
            _error = "disabled by MOH_CPU_KERNEL=0"
        else:
            try:
                _lib = _build()
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _error = str(e)
                warnings.warn(f"moh: the CPU kernels (gathered causal rows, decode steps) are not available ({e}); "
                              "using torch's kernels", RuntimeWarning, stacklevel=2)
    return _lib


def available() -> bool:
    return library() is not None


def build_error() -> Optional[str]:
    """Why the kernel is not available (None if it is, or was not tried yet)."""
    return _error


def _rows_view(t: Tensor) -> tuple[Tensor, int, int]:
    """(t as (B*P, L, hd) with unit last stride, stride per item-head, stride per row)."""
    B, P, L, hd = t.shape
    if t.stride(-1) != 1 or (B > 1 and P > 1 and t.stride(0) != P * t.stride(1)):
        t = t.contiguous()
    return t, t.stride(1) if P > 1 or B == 1 else t.stride(0), t.stride(2)


class _RowsAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, qpos, counts, scale, qblock, kblock, dblock):  # type: ignore[override]
        lib = library()
        B, P, M, hd = q.shape
        S = k.shape[2]
        qv, q_sb, q_sm = _rows_view(q)
        kv_, k_sb, k_ss = _rows_view(k)
        vv, v_sb, v_ss = _rows_view(v)
        pos = qpos.expand(B, P, M).contiguous().view(B * P, M)
        counts = None if counts is None else counts.to(torch.int64).contiguous()
        out = torch.empty(B, P, M, hd, dtype=q.dtype)
        lse = torch.empty(B, P, M, dtype=q.dtype)
        lib.moh_rows_forward(qv.data_ptr(), q_sb, q_sm, kv_.data_ptr(), k_sb, k_ss, vv.data_ptr(), v_sb, v_ss,
                             pos.data_ptr(), M, _ptr(counts), out.data_ptr(), lse.data_ptr(), B * P, M, hd, scale,
                             qblock, kblock, dblock, torch.get_num_threads())
        ctx.save_for_backward(qv, kv_, vv, pos, out, lse, counts)
        ctx.meta = (B, P, M, S, hd, q_sb, q_sm, k_sb, k_ss, v_sb, v_ss, scale, qblock, kblock, dblock)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        lib = library()
        qv, kv_, vv, pos, out, lse, counts = ctx.saved_tensors
        B, P, M, S, hd, q_sb, q_sm, k_sb, k_ss, v_sb, v_ss, scale, qblock, kblock, dblock = ctx.meta
        dout = dout.contiguous()
        dq = torch.zeros(B, P, M, hd, dtype=out.dtype)
        dk = torch.zeros(B, P, S, hd, dtype=out.dtype)
        dv = torch.zeros(B, P, S, hd, dtype=out.dtype)
        lib.moh_rows_backward(qv.data_ptr(), q_sb, q_sm, kv_.data_ptr(), k_sb, k_ss, vv.data_ptr(), v_sb, v_ss,
                              pos.data_ptr(), M, _ptr(counts), out.data_ptr(), dout.data_ptr(), lse.data_ptr(),
                              dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), B * P, M, S, hd, scale, qblock, kblock,
                              dblock, torch.get_num_threads())
        return dq, dk, dv, None, None, None, None, None, None


def rows_attention(q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, scale: float, qblock: int = 128,
                   kblock: int = 512, dblock: int = 64, check: bool = True, counts: Optional[Tensor] = None) -> Tensor:
    """softmax(q k^T * scale) v of rows q (B, P, M, hd), row m of head p seeing keys
    [0, qpos[b, p, m]] of k, v (B, P, S, hd); ``qpos`` (B, P or 1, M) int64, ascending along M,
    in [0, S). ``counts`` (B, P): rows m >= counts[b, p] are padding, not computed: output 0, no
    gradient (None: every row is real). fp32 CPU tensors; needs :func:`available`. ``check=False``
    skips the checks of shapes and row positions (the sparse backend, whose rows are built to fit)."""
    if library() is None:
        raise RuntimeError(f"moh's CPU kernels are not available: {build_error()}")
    if check:
        _check_fp32_cpu(q=q, k=k, v=v)
        B, P, M, hd = q.shape
        if k.shape != v.shape or k.dim() != 4 or tuple(k.shape[:2]) != (B, P) or k.shape[3] != hd:
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be (B, P, S, hd) = "
                             f"({B}, {P}, S, {hd}) for q {tuple(q.shape)}")
        if qpos.dim() != 3 or qpos.shape[0] != B or qpos.shape[1] not in (1, P) or qpos.shape[2] != M:
            raise ValueError(f"qpos {tuple(qpos.shape)} must be (B, P or 1, M) = ({B}, {P} or 1, {M})")
        if qblock < 1 or kblock < 1 or dblock < 1:
            raise ValueError(f"block sizes must be positive, got qblock={qblock} kblock={kblock} dblock={dblock}")
        if M and (int(qpos.min()) < 0 or int(qpos.max()) >= k.shape[2]):
            raise ValueError(f"qpos must lie in [0, S={k.shape[2]}), got values in "
                             f"[{int(qpos.min())}, {int(qpos.max())}]")
        if M > 1 and bool((qpos.diff(dim=-1) < 0).any()):
            raise ValueError("qpos must be ascending along M (rows sorted by key index)")
        if counts is not None and tuple(counts.shape) != (B, P):
            raise ValueError(f"counts {tuple(counts.shape)} must be (B, P) = ({B}, {P})")
    return _RowsAttention.apply(q, k, v, qpos.to(torch.int64), counts, scale, qblock, kblock, dblock)


def _check_fp32_cpu(**tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise TypeError(f"{name} must be an fp32 CPU tensor, got {t.dtype} on {t.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension, got strides {t.stride()}")


def decode_token(x: Tensor, q_weight: Tensor, q_bias: Optional[Tensor], active: Tensor, gates: Tensor, k: Tensor,
                 v: Tensor, key_mask: Optional[Tensor], scale: float, o_weight: Tensor, o_bias: Optional[Tensor] = None,
                 *, raw_queries: Optional[Tensor] = None, q_norm: Optional[tuple[Tensor, float]] = None,
                 rope: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """One decoded token of one sequence through its active heads only -> (Dout,):
    ``sum_h gates[h] * W_O[:, head h] softmax(scale * k[h // r] q_h) v[h // r] + o_bias`` over the
    heads with ``active[h]``, where q_h = RoPE(RMSNorm(W_Q[head h] x + q_bias[head h])).

    x (D,); q_weight (H*hd, D), q_bias (H*hd,) or None (a linear layer's); active (H,) bool, gates
    (H,); k and v (G, S, hd) the cache (views, read in place), r = H // G query heads per key/value
    head; key_mask (S,) bool or None (a head that sees no key adds 0); o_weight (Dout, H*hd),
    o_bias (Dout,) or None. ``raw_queries`` (H, hd): the raw projection (before norm and RoPE),
    already made (a router's), read instead of projecting; ``q_norm`` (weight (hd,), eps): RMSNorm
    of each query; ``rope`` (cos (hd,), sin (hd,)): the token's rotate-half RoPE factors. Only the
    active heads' rows of W_Q, cache and columns of W_O are read. Inference only (no autograd).
    Every argument is checked; :func:`decode_token_into` is the unchecked call (the sparse backend)."""
    if library() is None:
        raise RuntimeError(f"moh's CPU kernels are not available: {build_error()}")
    if k.dim() != 3 or active.dim() != 1 or o_weight.dim() != 2:
        raise ValueError(f"k must be (G, S, hd), active (H,) and o_weight (Dout, H*hd); got {tuple(k.shape)}, "
                         f"{tuple(active.shape)}, {tuple(o_weight.shape)}")
    G, S, hd = k.shape
    H, Dout, D = active.shape[0], o_weight.shape[0], x.shape[-1]
    norm_w, eps = (None, 0.0) if q_norm is None else q_norm
    cos, sin = (None, None) if rope is None else rope
    _check_fp32_cpu(x=x, q_weight=q_weight, q_bias=q_bias, gates=gates, k=k, v=v, o_weight=o_weight,
                    o_bias=o_bias, raw_queries=raw_queries, norm_weight=norm_w, cos=cos, sin=sin)
    if x.dim() != 1 or q_weight.shape != (H * hd, D) or (q_bias is not None and q_bias.shape != (H * hd,)):
        raise ValueError(f"q_weight {tuple(q_weight.shape)} / q_bias "
                         f"{None if q_bias is None else tuple(q_bias.shape)} do not fit x {tuple(x.shape)}, "
                         f"{H} heads of {hd}")
    if active.dtype != torch.bool or active.shape != (H,) or gates.shape != (H,):
        raise ValueError(f"active must be bool ({H},) and gates ({H},), got {active.dtype} "
                         f"{tuple(active.shape)} and {tuple(gates.shape)}")
    if G == 0 or H % G or tuple(v.shape) != (G, S, hd):
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be (G, S, {hd}) with G "
                         f"dividing the {H} heads")
    if o_weight.shape[1] != H * hd or (o_bias is not None and o_bias.shape != (Dout,)):
        raise ValueError(f"o_weight {tuple(o_weight.shape)} / o_bias "
                         f"{None if o_bias is None else tuple(o_bias.shape)} do not fit {H} heads of {hd}")
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != (S,)):
        raise ValueError(f"key_mask must be bool ({S},), got {key_mask.dtype} {tuple(key_mask.shape)}")
    if raw_queries is not None and raw_queries.shape != (H, hd):
        raise ValueError(f"raw_queries {tuple(raw_queries.shape)} must be ({H}, {hd})")
    for name, t in (("q_norm weight", norm_w), ("rope cos", cos), ("rope sin", sin)):
        if t is not None and (t.shape != (hd,) or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous ({hd},) tensor, got {tuple(t.shape)}")
    if rope is not None and hd % 2:
        raise ValueError(f"RoPE needs an even head width, got {hd}")
    # the kernel reads the mask and the active flags as plain arrays
    active, key_mask = active.contiguous(), None if key_mask is None else key_mask.contiguous()
    return decode_token_into(torch.empty(Dout), x, q_weight, q_bias, active, gates, k, v, key_mask, scale, o_weight,
                             o_bias, raw_queries, norm_w, eps, cos, sin)


def decode_token_into(out: Tensor, x: Tensor, q_weight: Tensor, q_bias: Optional[Tensor], active: Tensor, gates: Tensor,
                      k: Tensor, v: Tensor, key_mask: Optional[Tensor], scale: float, o_weight: Tensor,
                      o_bias: Optional[Tensor], raw_queries: Optional[Tensor], norm_w: Optional[Tensor], eps: float,
                      cos: Optional[Tensor], sin: Optional[Tensor]) -> Tensor:
    """:func:`decode_token` without checks, writing into ``out`` (``Dout`` contiguous floats, any
    shape), every other argument in memory as ``decode_token`` takes it, leading dimensions of size 1
    allowed (the sparse backend passes its (1, 1, ...) tensors without indexing: a decode step is
    short, and each operation counts). Returns ``out``."""
    H = active.shape[-1]
    library().moh_decode_token(x.data_ptr(), x.shape[-1], q_weight.data_ptr(), q_weight.stride(0), _ptr(q_bias),
                               _ptr(raw_queries), 0 if raw_queries is None else raw_queries.stride(-2),
                               active.data_ptr(), gates.data_ptr(), H, H // k.shape[-3], k.shape[-1], _ptr(norm_w), eps,
                               _ptr(cos), _ptr(sin), k.data_ptr(), k.stride(-3), k.stride(-2), v.data_ptr(),
                               v.stride(-3), v.stride(-2), k.shape[-2], _ptr(key_mask), scale, o_weight.data_ptr(),
                               o_weight.stride(0), _ptr(o_bias), o_weight.shape[0], out.data_ptr(),
                               torch.get_num_threads())
    return out


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def two_stage_router(x: Tensor, w_routed: Tensor, w_shared: Optional[Tensor], num_shared: int,
                     w_balance: Optional[Tensor], top_k: int, check: bool = True,
                     logits: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's two-stage router (``moh.core.routers.TwoStageRouter``) for the tokens of x
    (..., D) -> gates (..., H), active (..., H) bool, probs (..., E), H = num_shared + E. ``w_shared``
    (num_shared, D) or None (gate 1), ``w_balance`` (2, D) or None. Top-k ties go to the lower
    index. Inference only (no autograd). ``logits``: (n, L) (n tokens) with the logits of the weights given,
    in the order routed, shared, balance (x times the weights concatenated: many tokens, where one
    product beats a dot product per token and weight row); else the kernel computes them (a few
    tokens: decode steps). ``check=False``: the caller guarantees fp32, contiguous weights and
    the shapes (the router)."""
    if library() is None:
        raise RuntimeError(f"moh's CPU kernels are not available: {build_error()}")
    *lead, D = x.shape
    n, E = x.numel() // D if D else 0, w_routed.shape[0]
    if check:
        _check_fp32_cpu(x=x, w_routed=w_routed, w_shared=w_shared, w_balance=w_balance)
        if w_routed.shape != (E, D) or (w_shared is not None and w_shared.shape != (num_shared, D)) or \
                (w_balance is not None and w_balance.shape != (2, D)):
            raise ValueError(f"router weights {tuple(w_routed.shape)}, "
                             f"{None if w_shared is None else tuple(w_shared.shape)}, "
                             f"{None if w_balance is None else tuple(w_balance.shape)} do not fit x {tuple(x.shape)} "
                             f"with {num_shared} shared heads")
        if not 1 <= top_k <= E:
            raise ValueError(f"top_k={top_k} must be in [1, E={E}]")
        width = E + (0 if w_shared is None else num_shared) + (0 if w_balance is None else 2)
        if logits is not None:
            _check_fp32_cpu(logits=logits)
            if logits.shape != (n, width):
                raise ValueError(f"logits {tuple(logits.shape)} must be ({n}, {width}): routed, shared, balance")
        w_routed = w_routed.contiguous()
        w_shared = None if w_shared is None else w_shared.contiguous()
        w_balance = None if w_balance is None else w_balance.contiguous()
    x = x.contiguous()
    if logits is not None and logits.stride(-1) != 1:
        logits = logits.contiguous()
    H = num_shared + E
    gates = torch.empty(*lead, H)
    active = torch.empty(*lead, H, dtype=torch.bool)
    probs = torch.empty(*lead, E)
    library().moh_two_stage_router(x.data_ptr(), n, D, w_routed.data_ptr(), E,
                                   None if w_shared is None else w_shared.data_ptr(), num_shared,
                                   None if w_balance is None else w_balance.data_ptr(), top_k,
                                   None if logits is None else logits.data_ptr(),
                                   0 if logits is None else logits.stride(0), gates.data_ptr(), active.data_ptr(),
                                   probs.data_ptr(), torch.get_num_threads())
    return gates, active, probs


def head_rows(active_BTH: Tensor, heads: list[int], M: int, positions_BT: Tensor) -> dict[str, Tensor]:
    """For every item b and head ``heads[p]``: the tokens that use it, ascending, padded to M with
    T - 1, as (B, P, M) tensors: ``tokens``, ``flat`` (b * T + token), ``positions`` (the tokens'
    entries of ``positions_BT``), ``valid`` (bool: a real row, not padding), ``gate_index`` (flat *
    H + head: the row's gate in (B, T, H) in row-major order, as ``torch.take`` reads it); and
    ``counts`` (B, P). ``active_BTH``: a bool CPU tensor with unit last stride; ``positions_BT``
    int64 (B, T), any strides; M at least every count (tokens past M are dropped)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"moh's CPU kernels are not available: {build_error()}")
    if active_BTH.dtype != torch.bool or active_BTH.device.type != "cpu" or active_BTH.stride(-1) != 1:
        raise ValueError(f"active must be a bool CPU tensor with unit last stride, got {active_BTH.dtype} on "
                         f"{active_BTH.device} with strides {active_BTH.stride()}")
    B, T, H = active_BTH.shape
    if positions_BT.dtype != torch.int64 or positions_BT.device.type != "cpu" or tuple(positions_BT.shape) != (B, T):
        raise ValueError(f"positions must be an int64 CPU tensor of shape {(B, T)}, got {positions_BT.dtype} "
                         f"{tuple(positions_BT.shape)} on {positions_BT.device}")
    if any(not 0 <= h < H for h in heads):
        raise ValueError(f"heads {heads} must lie in [0, {H})")
    P = len(heads)
    out = {name: torch.empty(B, P, M, dtype=torch.int64) for name in ("tokens", "flat", "positions", "gate_index")}
    out["valid"] = torch.empty(B, P, M, dtype=torch.bool)
    out["counts"] = torch.empty(B, P, dtype=torch.int64)
    index = torch.tensor(heads, dtype=torch.int64)
    if B * P:
        lib.moh_head_rows(active_BTH.data_ptr(), B, T, H, active_BTH.stride(0), active_BTH.stride(1),
                          index.data_ptr(), P, M, positions_BT.data_ptr(), positions_BT.stride(0),
                          positions_BT.stride(1), out["tokens"].data_ptr(), out["counts"].data_ptr(),
                          out["flat"].data_ptr(), out["positions"].data_ptr(), out["valid"].data_ptr(),
                          out["gate_index"].data_ptr(), torch.get_num_threads())
    return out


# ---- per-head products of gathered rows ------------------------------------------------------


def _matrix(t: Tensor, name: str) -> tuple[int, int]:
    """(leading dimension, stored transposed) of a 2-d matrix with one unit stride (a weight
    block such as ``W[:, cols].t()`` is read in place)."""
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-d, got shape {tuple(t.shape)}")
    if t.stride(1) == 1 and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1]):
        return max(t.stride(0), t.shape[1], 1), 0
    if t.stride(0) == 1 and (t.shape[1] <= 1 or t.stride(1) >= t.shape[0]):
        return max(t.stride(1), t.shape[0], 1), 1
    raise ValueError(f"{name} must have a unit stride in one dimension, got strides {t.stride()}")


def _rows_arg(rows: Optional[Tensor], n: int, m: int, check: bool, name: str) -> Optional[Tensor]:
    if rows is None:
        if check and m != n:
            raise ValueError(f"{name}: without row indices the operand must have all n={n} rows, got {m}")
        return None
    rows = rows.to(torch.int64).contiguous()
    if check:
        if rows.dim() != 1 or rows.shape[0] != m:
            raise ValueError(f"{name}: rows {tuple(rows.shape)} must be ({m},), one per operand row")
        if m and (int(rows.min()) < 0 or int(rows.max()) >= n):
            raise ValueError(f"{name}: rows must lie in [0, {n}), got [{int(rows.min())}, {int(rows.max())}]")
        if m > 1 and bool((rows.diff() < 0).any()):
            raise ValueError(f"{name}: rows must be ascending")
    return rows


def _columns(rows: list[tuple[int, ...]], width: int) -> tuple[Tensor, list[int]]:
    """Per-piece integer fields (pointers, counts, strides) as one (width, J) int64 tensor and the
    address of each field's row: the kernels take one array per field."""
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, width).t().contiguous()
    step = table.shape[1] * 8
    return table, [table.data_ptr() + i * step for i in range(width)]


# a piece of scatter_mm as plain integers: (rows pointer or 0, count, a pointer, lda, k, b pointer,
# ldb, b stored transposed, scale pointer or 0, scale stride); the caller keeps the tensors alive
RawScatter = tuple[int, int, int, int, int, int, int, int, int, int]


def scatter_mm_raw(out: Tensor, pieces: list[RawScatter], zero: bool = False, tblock: int = 256,
                   mblock: int = 128, tiles: bool = True) -> Tensor:
    """``scatter_mm`` of pieces given as addresses and strides (``RawScatter``), unchecked: the
    sparse backend's output projection, which builds them by arithmetic on its tensors' addresses
    (a view per head costs more than the product of a few rows)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"moh's CPU kernels are not available: {build_error()}")
    n, D = out.shape
    pieces = [p for p in pieces if p[1] > 0]  # no rows: adds nothing (an empty tensor's address may be 0)
    table, cols = _columns(pieces, 10)  # table: alive until the call returns
    lib.moh_scatter_mm(out.data_ptr(), n, D, len(pieces), *cols, int(zero), tblock, mblock, int(tiles),
                       torch.get_num_threads())
    return out


def scatter_mm(out: Tensor, pieces: list[tuple], zero: bool = False, tblock: int = 256, mblock: int = 128,
               check: bool = True, tiles: bool = True) -> Tensor:
    """``out[rows] += a @ b`` (times ``scale``, one factor per row) for every piece (rows, a, b) or
    (rows, a, b, scale) in one pass over ``out`` (n, D), contiguous fp32: rows (m,) int64
    ascending (repeats allowed) or None for all n rows in order, a (m, k) with unit last stride,
    b (k, D) with one unit stride (a weight block such as ``W[:, h*hd:(h+1)*hd].t()``, read in
    place), scale (m,) fp32 (any stride) or None. ``zero``: ``out`` starts at 0. The output
    projection of gathered head rows (and the input gradient of the query projection): the rows
    are taken ``tblock`` at a time, so a block of ``out`` stays in cache while every piece adds to
    it. ``tiles``: moh's register tiles (default) or sgemm on blocks of rows. Returns ``out``. No
    autograd."""
    n, D = out.shape
    raw, keep = [], []
    for i, piece in enumerate(pieces):
        rows, a, b = piece[:3]
        scale = piece[3] if len(piece) > 3 else None
        if check:
            _check_fp32_cpu(**{f"pieces[{i}].a": a})
            if scale is not None and (scale.dtype != torch.float32 or scale.device.type != "cpu"):
                raise TypeError(f"pieces[{i}].scale must be an fp32 CPU tensor, got {scale.dtype} on {scale.device}")
            if a.dim() != 2 or b.dim() != 2 or b.shape != (a.shape[1], D):
                raise ValueError(f"pieces[{i}]: a {tuple(a.shape)} and b {tuple(b.shape)} must be (m, k) and (k, {D})")
            if b.dtype != torch.float32 or b.device.type != "cpu":
                raise TypeError(f"pieces[{i}].b must be an fp32 CPU tensor, got {b.dtype} on {b.device}")
            if scale is not None and tuple(scale.shape) != (a.shape[0],):
                raise ValueError(f"pieces[{i}]: scale {tuple(scale.shape)} must be ({a.shape[0]},), one per row")
        rows = _rows_arg(rows, n, a.shape[0], check, f"pieces[{i}]")
        ld, trans = _matrix(b, f"pieces[{i}].b")
        keep.append(rows)
        raw.append((_ptr(rows) or 0, a.shape[0], a.data_ptr(), max(a.stride(0), a.shape[1], 1), a.shape[1],
                    b.data_ptr(), ld, trans, _ptr(scale) or 0, 0 if scale is None else scale.stride(0)))
    if check:
        _check_fp32_cpu(out=out)
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    return scatter_mm_raw(out, raw, zero, tblock, mblock, tiles)


# a piece of gather_mm as plain integers: (rows pointer or 0, count, c pointer or 0, ldc, k, b pointer
# or 0, ldb, b stored transposed, e pointer or 0, lde, g pointer or 0, ldg, g stored transposed)
RawGather = tuple[int, int, int, int, int, int, int, int, int, int, int, int, int]


def gather_mm_raw(x: Tensor, pieces: list[RawGather], tblock: int = 512, mblock: int = 256,
                  tiles: bool = True) -> None:
    """``gather_mm`` of pieces given as addresses and strides (``RawGather``), unchecked, writing
    the products where the c pointers say: the sparse backend's query projection."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"moh's CPU kernels are not available: {build_error()}")
    n, D = x.shape
    pieces = [p for p in pieces if p[1] > 0]  # nothing to read (an empty tensor's address may be 0)
    table, cols = _columns(pieces, 13)  # table: alive until the call returns
    lib.moh_gather_mm(x.data_ptr(), n, D, len(pieces), *cols, tblock, mblock, int(tiles), torch.get_num_threads())


def gather_mm(x: Tensor, pieces: list[tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]],
              tblock: int = 512, mblock: int = 256, check: bool = True,
              out: Optional[list[Optional[Tensor]]] = None, tiles: bool = True) -> list[Optional[Tensor]]:
    """For every piece (rows, b, e, g), with xr = ``x[rows]`` (x (n, D) contiguous fp32; rows (m,)
    int64 ascending, or None for all n rows): returns ``xr @ b`` (m, k) where b (D, k) is given
    (one unit stride: a weight block read in place), else None; and where g (k, D) is given (a
    view of a weight gradient with one unit stride) adds ``e.t() @ xr`` to it in place, e (m, k)
    with unit last stride. ``out``: a contiguous (m, k) tensor per piece to write ``xr @ b`` to
    (None: a new one). The query projection of gathered rows and its weight gradient, the
    gradient of the output projection: x is read ``tblock`` rows at a time for all pieces. No
    autograd."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"moh's CPU kernels are not available: {build_error()}")
    n, D = x.shape
    if check:
        _check_fp32_cpu(x=x)
        if not x.is_contiguous():
            raise ValueError("x must be contiguous")
    outs: list[Optional[Tensor]] = []
    raw, keep = [], []
    for i, (rows, b, e, g) in enumerate(pieces):
        m = (rows.shape[0] if rows is not None else n)
        if b is None and g is None:
            raise ValueError(f"pieces[{i}]: nothing to compute (b and g both None)")
        k = b.shape[1] if b is not None else g.shape[0]
        if check:
            _check_fp32_cpu(**{f"pieces[{i}].e": e})
            for name, t in (("b", b), ("g", g)):
                if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
                    raise TypeError(f"pieces[{i}].{name} must be an fp32 CPU tensor, got {t.dtype} on {t.device}")
            if b is not None and (b.dim() != 2 or b.shape[0] != D):
                raise ValueError(f"pieces[{i}]: b {tuple(b.shape)} must be ({D}, k)")
            if g is not None and (g.dim() != 2 or tuple(g.shape) != (k, D) or e is None or tuple(e.shape) != (m, k)):
                raise ValueError(f"pieces[{i}]: g {tuple(g.shape)} must be ({k}, {D}) and e "
                                 f"{None if e is None else tuple(e.shape)} ({m}, {k})")
        rows = _rows_arg(rows, n, m, check, f"pieces[{i}]")
        c = None if b is None else (out[i] if out is not None and out[i] is not None else torch.empty(m, k, dtype=x.dtype))
        if check and c is not None and (tuple(c.shape) != (m, k) or not c.is_contiguous() or c.dtype != x.dtype):
            raise ValueError(f"out[{i}] must be a contiguous ({m}, {k}) {x.dtype} tensor, got {tuple(c.shape)}")
        outs.append(c)
        ldb, bt = _matrix(b, f"pieces[{i}].b") if b is not None else (0, 0)
        ldg, gt = _matrix(g, f"pieces[{i}].g") if g is not None else (0, 0)
        keep.append(rows)
        raw.append((_ptr(rows) or 0, m, _ptr(c) or 0, k, k, _ptr(b) or 0, ldb, bt, _ptr(e) or 0,
                    0 if e is None else max(e.stride(0), k, 1), _ptr(g) or 0, ldg, gt))
    gather_mm_raw(x, raw, tblock, mblock, tiles)
    return outs
