"""moh's C++ CPU kernel for gathered causal rows against a float64 reference: outputs and
gradients, block sizes that split tiny problems into many blocks, 1 and 2 threads, strided
key/value views, broadcast and repeated row positions; its build cache and its fallback."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from moh.backends.sparse import cpu_kernels, kernels
from moh.backends.sparse.tuning import CPU, CPU_TORCH, replace, tuning_for

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=f"no C++ build here: {cpu_kernels.build_error()}")


def reference(q, k, v, qpos, scale):
    scores = (q @ k.transpose(-1, -2)) * scale
    future = torch.arange(k.shape[2]) > qpos[..., None]
    return torch.softmax(scores.masked_fill(future, float("-inf")), -1) @ v


def rows(B, P, M, S, gen, repeat_last=0):
    """(B, P, M) ascending key indices: M - repeat_last distinct ones, then the last repeated
    (the sparse backend pads a head's rows this way)."""
    distinct = M - repeat_last
    out = torch.stack([torch.stack([torch.randperm(S, generator=gen)[:distinct].sort().values for _ in range(P)])
                       for _ in range(B)])
    return torch.cat([out, out[..., -1:].expand(B, P, repeat_last)], -1)


CASES = [  # B, P, M, S, hd, (rows per block, key chunk, diagonal chunk)
    (1, 1, 1, 1, 4, (128, 512, 64)),
    (1, 1, 37, 50, 16, (128, 512, 64)),
    (2, 3, 40, 90, 8, (7, 5, 3)),
    (1, 2, 300, 700, 64, (128, 512, 64)),
    (3, 1, 60, 200, 20, (16, 32, 8)),
    (1, 1, 90, 90, 16, (32, 16, 16)),  # every position: one row per key
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}P{c[1]}M{c[2]}S{c[3]}hd{c[4]}b{c[5][0]}" for c in CASES])
def test_rows_attention_matches_reference(case, threads):
    B, P, M, S, hd, blocks = case
    gen = torch.Generator().manual_seed(sum(case[:5]))
    qpos = torch.arange(S).expand(B, P, S) if M == S else rows(B, P, M, S, gen, repeat_last=min(3, M - 1))
    q = torch.randn(B, P, M, hd, generator=gen, requires_grad=True)
    k = torch.randn(B, P, S, hd, generator=gen, requires_grad=True)
    v = torch.randn(B, P, S, hd, generator=gen, requires_grad=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_kernels.rows_attention(q, k, v, qpos, 0.37, *blocks)
        dout = torch.randn(out.shape, generator=gen)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    finally:
        torch.set_num_threads(before)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, qpos, 0.37)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=5e-5, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")


def test_strided_views_and_broadcast_positions():
    """Keys/values as the backend passes them (views of a (B, S, G, hd) projection, rows G*hd
    apart), queries a non-contiguous view, one row index per item shared by all heads."""
    gen = torch.Generator().manual_seed(3)
    B, S, G, hd, M = 2, 120, 3, 16, 50
    kv = torch.randn(2, B, S, G, hd, generator=gen)
    k, v = kv[0].transpose(1, 2)[:, 1:3], kv[1].transpose(1, 2)[:, 1:3]  # (B, 2, S, hd), strided
    q = torch.randn(B, M, 2, hd, generator=gen).transpose(1, 2)  # (B, 2, M, hd), strided
    qpos = rows(B, 1, M, S, gen)
    assert not k.is_contiguous() and not q.is_contiguous()
    out = cpu_kernels.rows_attention(q, k, v, qpos, 0.25, 16, 32, 8)
    torch.testing.assert_close(out, reference(q, k, v, qpos, 0.25), atol=2e-5, rtol=1e-4)


def test_bad_inputs_are_named():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        cpu_kernels.rows_attention(q, q, q, torch.arange(4).view(1, 1, 4), 1.0)


def test_the_sparse_backend_chooses_it():
    assert tuning_for("cpu") is CPU
    assert kernels.choose_kernel("cpu", torch.float32, "causal_rows", 100, 200, False, CPU) == "cpu_rows"
    assert kernels.choose_kernel("cpu", torch.float32, "causal_rows", 100, 200, False,
                                 replace(CPU, cpu_rows=False)) == "flash_rows"
    assert kernels.choose_kernel("cpu", torch.bfloat16, "causal_rows", 100, 200, False, CPU) == "blocks"
    assert kernels.choose_kernel("cpu", torch.float32, "causal_rows", 100, 200, True, CPU) == "blocks"


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """The module as if never loaded, building into an empty cache."""
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setattr(cpu_kernels, "_error", None)
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setenv("MOH_KERNEL_CACHE", str(tmp_path))
    return tmp_path


def test_build_is_cached_and_atomic(fresh):
    assert cpu_kernels.available()
    built = sorted(os.listdir(fresh))
    assert len(built) == 1 and built[0].startswith("rows_attention-") and built[0].endswith(".so"), built
    stamp = os.stat(fresh / built[0]).st_mtime_ns
    cpu_kernels._tried, cpu_kernels._lib = False, None
    assert cpu_kernels.available()  # loads the cached library, does not rebuild
    assert sorted(os.listdir(fresh)) == built and os.stat(fresh / built[0]).st_mtime_ns == stamp


@pytest.mark.parametrize("how", ["disabled", "no_compiler", "bad_source"])
def test_fallback_to_torch_kernels(fresh, monkeypatch, how, tmp_path_factory):
    if how == "disabled":
        monkeypatch.setenv("MOH_CPU_KERNEL", "0")
        expected = "MOH_CPU_KERNEL=0"
    elif how == "no_compiler":
        monkeypatch.setenv("CXX", "moh-no-such-compiler")
        expected = "moh-no-such-compiler"
    else:
        bad = tmp_path_factory.mktemp("src") / "rows_attention.cpp"
        bad.write_text("this is not C++\n")
        monkeypatch.setattr(cpu_kernels, "SOURCE", bad)
        expected = "failed"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not cpu_kernels.available()
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(said) == (0 if how == "disabled" else 1) and all("not available" in m for m in said), said
    assert expected in cpu_kernels.build_error()
    assert os.listdir(fresh) == []  # nothing partial left in the cache
    assert kernels.choose_kernel("cpu", torch.float32, "causal_rows", 100, 200, False, CPU) == "flash_rows"
    assert tuning_for("cpu") is CPU_TORCH  # and the plan's thresholds for torch's kernels
    with pytest.raises(RuntimeError, match="not available"):
        cpu_kernels.rows_attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4),
                                   torch.tensor([[[0, 2]]]), 1.0)

