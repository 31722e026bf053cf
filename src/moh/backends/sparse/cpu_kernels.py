"""moh's own CPU kernel for causal attention of gathered rows (``csrc/rows_attention.cpp``).

torch's CPU kernels run gathered causal rows at about half the rate of a whole causal head: a
row's keys end at its own position, so no single call covers many rows (RESULTS.md, issue 11).
This kernel takes blocks of up to ``qblock`` rows at once, reads the keys every row of the block
sees in chunks without a mask and the diagonal keys in short chunks with only the rows that see
them, and keeps an online softmax per row (no score matrix is written out); the products are
the process's BLAS ``sgemm`` (torch's MKL). Forward and backward; fp32 CPU tensors.

The C++ source is compiled on first use with the system C++ compiler (``$CXX``, else ``g++``;
about one second) against torch's own libraries, into a cache directory keyed by the source,
the flags, the compiler and the CPU (``$MOH_KERNEL_CACHE``, else ``~/.cache/moh/kernels``);
the shared library is written to a temporary name and renamed, so a concurrent or interrupted
build never leaves a partial file. Without a compiler, with a failed build, or with
``MOH_CPU_KERNEL=0`` :func:`available` is False and the sparse backend uses torch's kernels
(``moh.backends.sparse.kernels.causal_flash``); :func:`build_error` says why.

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

SOURCE = Path(__file__).with_name("csrc") / "rows_attention.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
ABI = 1  # moh_rows_abi() of the source this module speaks to

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
    target = cache_dir() / f"rows_attention-{key}.so"
    if not target.exists():
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
    lib.moh_rows_forward.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, ptr, i64, ptr, ptr,
                                     i64, i64, i64, f32, i64, i64, i64, ctypes.c_int]
    lib.moh_rows_backward.restype = None
    lib.moh_rows_backward.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, ptr, i64, ptr, ptr, ptr,
                                      ptr, ptr, ptr, i64, i64, i64, i64, f32, i64, i64, i64, ctypes.c_int]
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
                warnings.warn(f"moh: the CPU kernel for gathered causal rows is not available ({e}); "
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
    def forward(ctx, q, k, v, qpos, scale, qblock, kblock, dblock):  # type: ignore[override]
        lib = library()
        B, P, M, hd = q.shape
        S = k.shape[2]
        qv, q_sb, q_sm = _rows_view(q)
        kv_, k_sb, k_ss = _rows_view(k)
        vv, v_sb, v_ss = _rows_view(v)
        pos = qpos.expand(B, P, M).contiguous().view(B * P, M)
        out = torch.empty(B, P, M, hd, dtype=q.dtype)
        lse = torch.empty(B, P, M, dtype=q.dtype)
        lib.moh_rows_forward(qv.data_ptr(), q_sb, q_sm, kv_.data_ptr(), k_sb, k_ss, vv.data_ptr(), v_sb, v_ss,
                             pos.data_ptr(), M, out.data_ptr(), lse.data_ptr(), B * P, M, hd, scale, qblock, kblock,
                             dblock, torch.get_num_threads())
        ctx.save_for_backward(qv, kv_, vv, pos, out, lse)
        ctx.meta = (B, P, M, S, hd, q_sb, q_sm, k_sb, k_ss, v_sb, v_ss, scale, qblock, kblock, dblock)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        lib = library()
        qv, kv_, vv, pos, out, lse = ctx.saved_tensors
        B, P, M, S, hd, q_sb, q_sm, k_sb, k_ss, v_sb, v_ss, scale, qblock, kblock, dblock = ctx.meta
        dout = dout.contiguous()
        dq = torch.zeros(B, P, M, hd, dtype=out.dtype)
        dk = torch.zeros(B, P, S, hd, dtype=out.dtype)
        dv = torch.zeros(B, P, S, hd, dtype=out.dtype)
        lib.moh_rows_backward(qv.data_ptr(), q_sb, q_sm, kv_.data_ptr(), k_sb, k_ss, vv.data_ptr(), v_sb, v_ss,
                              pos.data_ptr(), M, out.data_ptr(), dout.data_ptr(), lse.data_ptr(), dq.data_ptr(),
                              dk.data_ptr(), dv.data_ptr(), B * P, M, S, hd, scale, qblock, kblock, dblock,
                              torch.get_num_threads())
        return dq, dk, dv, None, None, None, None, None


def rows_attention(q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, scale: float, qblock: int = 128,
                   kblock: int = 512, dblock: int = 64) -> Tensor:
    """softmax(q k^T * scale) v of rows q (B, P, M, hd), row m of head p seeing keys
    [0, qpos[b, p, m]] of k, v (B, P, S, hd); ``qpos`` (B, P or 1, M) int64, ascending along M,
    in [0, S). fp32 CPU tensors; needs :func:`available`."""
    if library() is None:
        raise RuntimeError(f"moh's CPU rows kernel is not available: {build_error()}")
    if q.dtype != torch.float32 or k.dtype != torch.float32 or v.dtype != torch.float32:
        raise TypeError(f"rows_attention takes fp32 tensors, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device.type != "cpu":
        raise ValueError(f"rows_attention runs on CPU tensors, got {q.device}")
    return _RowsAttention.apply(q, k, v, qpos.to(torch.int64), scale, qblock, kblock, dblock)
