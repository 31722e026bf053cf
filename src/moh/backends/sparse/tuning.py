"""Tuning of the sparse backend: one frozen object per device kind, passed in, never patched.

The CPU values were measured on 2-core VMs (AMD EPYC, and Intel Xeon with AVX-512 for moh's rows
kernel; D=768, hd=64, torch 2.13; RESULTS.md sections 1 and 8 have the measurements). The CUDA entry is a placeholder for the GPU kernels to tune on
the device; until then it only turns off what exists for CPU tensors alone.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from moh.kernels import cpu as cpu_kernels


@dataclass(frozen=True)
class SparseTuning:
    # causal query rows per score block of the hand-written blocked kernel
    row_block: int = 128
    # partial heads are processed a few at a time so their gathered rows (B, P, M, D) stay near
    # this size: measured faster than one large batch (75% heads, N=2048, D=768: 284 vs 322 ms),
    # large temporaries being slow to allocate and falling out of cache. On CPU one head at a time
    # (1 byte: every chunk is one head): no padding to the largest head's count, and the flash
    # backward of causal rows shares no row blocks between heads (50% heads, N=2048, 1 thread,
    # training step 610-632 vs 618-645 ms for chunks of 3, forward within noise)
    chunk_bytes: int = 8 << 20
    # the same with more than one thread (None: chunk_bytes). On CPU at 2 threads one head per
    # chunk leaves the second thread idle in the many per-head operations; chunks of several heads
    # (batched) win for bidirectional rows (50% heads, N=2048, Xeon VM, % of ideal, one head / 8
    # MB / 32 MB: forward 76 / 80 / 81, training step 74 / 79 / 82; 75% training 78 / - / 86) and
    # are even for causal ones (forward 79 / 81 / 78, training 78 / 76 / 79)
    chunk_bytes_threaded: Optional[int] = None
    # fraction of rows from which a head is computed for all rows instead of gathered: a gathered
    # (row, head) costs more than one of a head computed whole (gather, 64-wide projections, and
    # for causal attention with torch's kernels blocks of rows instead of SDPA's causal kernel).
    # With moh's CPU rows kernel causal rows are gathered as readily (75% heads, routed heads used
    # by 70% of tokens, N=2048, 1 thread, Xeon VM, dense_from_causal 0.6 / 0.75 / 0.85 / 1.01:
    # forward 144 / 130 / 129 / 130 ms, training step 463 / 399 / 407 / 409 ms); with torch's
    # kernels 0.6 was best (``CPU_TORCH``)
    dense_from: float = 0.85
    dense_from_causal: float = 0.85
    # rows are gathered only with at least this many key positions per unit of width: gathering
    # lost at every head ratio for a tiny ViT (17 keys, D=128: 1139 vs 1757 images/s at 50%) and
    # won at 512 keys for D=768 (1 thread; at 2 threads about even)
    gather_min_keys_per_width: float = 0.5
    # rows per block of the backward of the CPU flash-kernel causal path (32-256 measured: 64 best)
    flash_block: int = 64
    # key positions per grid block of its forward (one head x 850 rows at N=2048, 1 thread: 64 / 128
    # / 256 -> 6.7 / 6.4 / 6.7 ms; the row blocks of the backward, 64 rows: 7.3-7.6 ms)
    flash_grid: int = 128
    # query rows per head up to which two matmuls replace SDPA (decode steps: CPU SDPA on one row
    # of a few heads is ~2x slower, 1.7 vs 0.8 ms for 6 heads over a 4k cache)
    few_rows: int = 4
    # decode steps of a batch (B > 1) read each sequence's own heads only from this many cached
    # positions on (below, every head any sequence uses is read for all: fewer operations).
    # D=768, 12 heads, 50%, B=8, 1 thread, ms per layer, union / per sequence (SDPA): 256 keys
    # 3.81 / 4.34 (3.22), 512: 5.19 / 5.00 (4.58), 1024: 5.76 / 4.60 (5.16), 4096: 38.1 / 13.5 (22.8)
    decode_per_sequence_keys: int = 512
    # moh's C++ kernel for gathered causal rows on CPU (moh.kernels.cpu; built on
    # first use, torch's kernels below if it cannot be). One head x 840 of 2048 rows, hd=64, 1
    # thread, Intel Xeon (AVX-512) VM: forward 2.0 ms, forward+backward 6.4 ms, against 3.8 / 12.6
    # for the flash rows below and 2.1 / 7.1 for the same pairs inside SDPA's dense causal kernel
    cpu_rows: bool = True
    # its rows per block (64 / 128 / 256: forward 2.1 / 2.0 / 2.0 ms, training 6.6 / 6.4 / 6.4),
    # keys per chunk that every row of a block sees (unmasked), and per chunk of the diagonal
    # (32 / 64 / 128: 2.0 / 2.0 / 2.0 ms)
    rows_block: int = 128
    # the rows kernel for all bidirectional gathered rows (every row at the last key), not only
    # where a chunk's rows end in padding (which it skips and SDPA would compute). Off: even with
    # SDPA in the layer (N=2048, 50%, 1 thread, % of ideal, on / off: forward 90.7 / 90.0,
    # training 92.5 / 91.6; N=4096 forward 92.1 / 93.7), though faster alone (10 heads x ~820 of
    # 2048 rows, keys/values strided views, one call per head, ms, rows per block x keys per
    # chunk 128 x 512: 42.8, 256 x 512: 40.4, 1024 x 256: 39.5; SDPA 41.0)
    cpu_rows_all: bool = False
    # its rows per block and keys per chunk for bidirectional rows
    rows_block_all: int = 256
    rows_key_chunk_all: int = 512
    rows_key_chunk: int = 512
    rows_diagonal_chunk: int = 64
    # moh's C++ kernels for the per-head query and output projections of gathered rows and their
    # gradients (moh.kernels.cpu.gather_mm / scatter_mm: the token rows a block at a time for all
    # heads, instead of one gather, product and scatter-add per head)
    cpu_projections: bool = True
    # moh's C++ CPU kernels for a decode step of one sequence (B = 1, inference): see
    # backend._one_token_cpu
    cpu_decode: bool = True
    # torch's fused CPU flash kernel for gathered causal rows (exists for CPU tensors only)
    cpu_flash: bool = True
    # SDPA takes a boolean mask and returns 0 for rows that see no key (torch's CPU kernels do);
    # False: an additive mask with the dtype's minimum and explicit zeroing of such rows, which
    # gives the same result with every SDPA implementation
    sdpa_bool_mask: bool = True
    # Triton kernels (moh.backends.sparse.triton_kernels) for CUDA tensors, when triton imports:
    # gathered causal rows and one-token decode steps
    triton: bool = False
    # their block sizes (a triton_kernels.TritonTuning); None: triton_kernels.default_tuning
    triton_tuning: Optional[Any] = None

    def __post_init__(self) -> None:
        for name in ("row_block", "chunk_bytes", "chunk_bytes_threaded", "flash_block", "flash_grid", "few_rows",
                     "rows_block", "rows_block_all", "rows_key_chunk", "rows_key_chunk_all",
                     "rows_diagonal_chunk"):
            if getattr(self, name) is not None and getattr(self, name) < (0 if name == "few_rows" else 1):
                raise ValueError(f"SparseTuning.{name}={getattr(self, name)} must be positive")


CPU = SparseTuning(chunk_bytes=1, chunk_bytes_threaded=32 << 20)
# Not tuned on a GPU yet (no device measured): the portable kernels, with the CPU-only fused
# flash path and the boolean-mask assumption off; the GPU kernels set their own values here.
CUDA = SparseTuning(cpu_rows=False, cpu_decode=False, cpu_projections=False, cpu_flash=False, sdpa_bool_mask=False, few_rows=0, triton=True)
PORTABLE = SparseTuning(cpu_rows=False, cpu_decode=False, cpu_projections=False, cpu_flash=False, sdpa_bool_mask=False)

# CPU without moh's rows kernel (no compiler, or MOH_CPU_KERNEL=0): torch's flash kernel for
# causal rows, which loses to whole heads from 60% of rows on
CPU_TORCH = replace(CPU, cpu_rows=False, cpu_decode=False, cpu_projections=False, dense_from_causal=0.6)
TUNINGS = {"cpu": CPU, "cuda": CUDA}


def tuning_for(device: str | torch.device) -> SparseTuning:
    """The tuning of a device kind ("cpu", "cuda", ...); other kinds get the portable one. On CPU
    the first call builds moh's rows kernel if it is not built yet (``moh.kernels.cpu``)."""
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if kind == "cpu":
        return CPU if cpu_kernels.available() else CPU_TORCH
    return TUNINGS.get(kind, PORTABLE)


__all__ = ["SparseTuning", "CPU", "CPU_TORCH", "CUDA", "PORTABLE", "TUNINGS", "tuning_for", "replace"]
