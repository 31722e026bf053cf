"""The sparse backend with its CUDA kernel choice (Triton rows attention, split-K decode) equals
``reference`` end to end: outputs and gradients, causal rows with a cache offset and key padding,
grouped-query attention, one-token decode steps. Without CUDA the Triton kernels run in Triton's
CPU interpreter (``TRITON_INTERPRET=1``, set before triton is imported), with the kernel choice
forced to "cuda" on CPU tensors."""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed: the CUDA kernel path cannot run")

_MOD = "moh.backends.sparse.triton_kernels"
if _MOD in sys.modules and not torch.cuda.is_available() and not sys.modules[_MOD]._interpreting():
    importlib.reload(sys.modules[_MOD])
tk = importlib.import_module(_MOD)

from moh import BACKENDS, MoHAttention, MoHConfig  # noqa: E402
from moh.backends.sparse import SparseBackend, kernels  # noqa: E402
from moh.backends.sparse.tuning import CUDA, replace  # noqa: E402
from moh.core.cache import KVCache  # noqa: E402

SMALL = tk.TritonTuning(block_m=16, block_n=16, bwd_block_m=16, bwd_block_n=16, dq_block_m=16, dq_block_n=16,
                        decode_block_n=16, decode_min_keys=16, decode_programs=8, mm_block_m=16, mm_block_n=16,
                        mm_block_k=16)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# every used head gathered (dense_from > 1), so the Triton rows kernel does the causal rows
TRITON = SparseBackend(replace(CUDA, triton=True, triton_tuning=SMALL, dense_from=1.01, dense_from_causal=1.01),
                       device="cuda")


@pytest.fixture(autouse=True, scope="module")
def triton_backend():
    """Registered only while this module's tests run (other modules iterate over BACKENDS)."""
    BACKENDS.register("sparse_triton_test", overwrite=True)(TRITON)
    yield
    BACKENDS.unregister("sparse_triton_test")


def layer(**kw) -> MoHAttention:
    torch.manual_seed(0)
    m = MoHAttention(MoHConfig(**kw)).to(DEVICE)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    return m


def run(m, backend, x, mask=None, cache_prefix=None):
    m.set_backend(backend)
    m.zero_grad(set_to_none=True)
    cache = None
    if cache_prefix is not None:
        cache = KVCache(capacity=4)
        with torch.no_grad():
            m(cache_prefix, None if mask is None else mask[:, : cache_prefix.shape[1]], cache)
    x = x.detach().clone().requires_grad_(True)
    out = m(x, mask, cache).output
    (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


def test_the_choice_takes_the_triton_kernel():
    assert kernels.choose_kernel("cuda", torch.float32, "causal_rows", 20, 40, False, TRITON.tuning) == "triton_rows"
    assert kernels.choose_kernel("cuda", torch.float32, "causal_padding", 20, 40, False, TRITON.tuning) == "triton_rows"
    assert kernels.choose_kernel("cuda", torch.float32, "causal_rows", 20, 40, True, TRITON.tuning) == "blocks"
    assert kernels.choose_kernel("cpu", torch.float32, "causal_rows", 20, 40, False, TRITON.tuning) == "blocks"


@pytest.mark.parametrize("prefix, padded, kv_heads", [(0, False, 4), (7, True, 2)])
def test_causal_rows_match_reference(prefix, padded, kv_heads):
    m = layer(dim=32, num_heads=4, num_kv_heads=kv_heads, num_shared=1, top_k=1, causal=True, rope=True, qk_norm=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 21, 32, generator=gen).to(DEVICE)
    pre = torch.randn(2, prefix, 32, generator=gen).to(DEVICE) if prefix else None
    mask = None
    if padded:
        mask = torch.ones(2, prefix + 21, dtype=torch.bool, device=DEVICE)
        mask[1, :9] = False  # left padding reaching into the new rows: some rows see no key
    want = run(m, "reference", x, mask, pre)
    got = run(m, "sparse_triton_test", x, mask, pre)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)
    for name, g in got[2].items():
        torch.testing.assert_close(g, want[2][name], atol=1e-4, rtol=1e-4, msg=lambda s: f"d{name}: {s}")


def test_decode_steps_match_reference():
    """Token-by-token decoding through the split-K kernel (inactive heads read no cache)."""
    m = layer(dim=32, num_heads=4, num_kv_heads=2, num_shared=1, top_k=1, causal=True, rope=True).eval()
    x = torch.randn(3, 40, 32).to(DEVICE)
    pad = torch.ones(3, 40, dtype=torch.bool, device=DEVICE)
    pad[2, :3] = False
    full = m(x, pad).output
    m.set_backend("sparse_triton_test")
    cache = KVCache(capacity=8)
    with torch.no_grad():
        outs = [m(x[:, :36], pad[:, :36], cache).output]
        for t in range(36, 40):
            outs.append(m(x[:, t : t + 1], pad[:, : t + 1], cache).output)
    # fp32 sums in other orders (the full pass's CPU tiles, the split-K kernel): ~1e-5 apart
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=5e-5, rtol=1e-4)
