"""moh's C++ CPU kernel for gathered causal rows against a float64 reference: outputs and
gradients, block sizes that split tiny problems into many blocks, 1 and 2 threads, strided
key/value views, broadcast and repeated row positions; its build cache and its fallback."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from moh.backends.sparse import kernels
from moh.eval import num_threads
from moh.kernels import cpu as cpu_kernels
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
    with num_threads(threads):
        out = cpu_kernels.rows_attention(q, k, v, qpos, 0.37, *blocks)
        dout = torch.randn(out.shape, generator=gen)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, qpos, 0.37)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=5e-5, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_attention_skips_padding_rows(threads):
    """With ``counts``, rows past an item-head's count (padding) are not computed: output 0, no
    gradient, and the real rows' outputs and gradients are those of the real rows alone;
    counts of 0 and of every row, and padding that spans whole row blocks."""
    gen = torch.Generator().manual_seed(11 + threads)
    B, P, M, S, hd = 2, 3, 40, 90, 8
    counts = torch.tensor([[40, 0, 17], [3, 25, 9]])
    qpos = rows(B, P, M, S, gen)
    q = torch.randn(B, P, M, hd, generator=gen, requires_grad=True)
    k = torch.randn(B, P, S, hd, generator=gen, requires_grad=True)
    v = torch.randn(B, P, S, hd, generator=gen, requires_grad=True)
    real = torch.arange(M) < counts[..., None]  # (B, P, M)
    dout = torch.randn(B, P, M, hd, generator=gen)
    with num_threads(threads):
        out = cpu_kernels.rows_attention(q, k, v, qpos, 0.5, 8, 16, 4, counts=counts)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    assert bool((out[~real] == 0).all()) and bool((grads[0][~real] == 0).all())
    ref = reference(q, k, v, qpos, 0.5) * real[..., None]  # padding rows contribute nothing
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, atol=5e-5, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")
    with pytest.raises(ValueError, match=r"counts \(3,\) must be \(B, P\)"):
        cpu_kernels.rows_attention(q, k, v, qpos, 0.5, counts=torch.tensor([1, 2, 3]))


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
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 6, 8)
    cases = [
        (dict(qpos=torch.tensor([[[0, 1, 2, 6]]])), r"\[0, S=6\), got values in \[0, 6\]"),
        (dict(qpos=torch.tensor([[[-1, 1, 2, 3]]])), r"got values in \[-1, 3\]"),
        (dict(qpos=torch.tensor([[[0, 3, 2, 5]]])), "ascending"),
        (dict(qpos=torch.tensor([[0, 1, 2, 3]])), r"qpos \(1, 4\) must be"),
        (dict(k=torch.randn(1, 1, 6, 4)), r"k \(1, 1, 6, 4\)"),
        (dict(qblock=0), "qblock=0"),
    ]
    for change, message in cases:
        kw = dict(q=q, k=k, v=k, qpos=torch.tensor([[[0, 1, 2, 5]]]), scale=1.0) | change
        with pytest.raises(ValueError, match=message):
            cpu_kernels.rows_attention(**kw)


def test_the_sparse_backend_chooses_it():
    assert tuning_for("cpu") is CPU
    assert kernels.choose_kernel("cpu", torch.float32, "causal_rows", 100, 200, False, CPU) == "cpu_rows"
    assert kernels.choose_kernel("cpu", torch.float32, "causal_rows", 100, 200, False,
                                 replace(CPU, cpu_rows=False)) == "flash_rows"
    assert kernels.choose_kernel("cpu", torch.bfloat16, "causal_rows", 100, 200, False, CPU) == "blocks"
    assert kernels.choose_kernel("cpu", torch.float32, "causal_rows", 100, 200, True, CPU) == "blocks"
    # bidirectional rows: SDPA, unless a chunk's rows end in padding (the rows kernel skips it)
    assert kernels.choose_kernel("cpu", torch.float32, "none", 100, 200, False, CPU) == "sdpa"
    assert kernels.choose_kernel("cpu", torch.float32, "none", 100, 200, False, CPU, padded=True) == "cpu_rows_all"
    assert kernels.choose_kernel("cpu", torch.float32, "padding", 100, 200, False, CPU, padded=True) == "sdpa"
    assert kernels.choose_kernel("cpu", torch.float32, "none", 100, 200, True, CPU, padded=True) == "sdpa"
    assert kernels.choose_kernel("cpu", torch.float32, "none", 100, 200, False, CPU_TORCH, padded=True) == "sdpa"


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
    assert len(built) == 1 and built[0].startswith("cpu_kernels-") and built[0].endswith(".so"), built
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
        bad = tmp_path_factory.mktemp("src") / "cpu_kernels.cpp"
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



# ---------------------------------------------------------------------------------------------
# decode steps of one sequence


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("hd", [16, 20, 48])  # whole vectors of 16 floats, not, and an odd number of them
def test_decode_token_matches_reference(threads, hd):
    """Against torch operations: GQA (two query heads per key/value head), a cache view with spare
    capacity, key padding with a fully masked case, gates, biases, qk-norm, RoPE, the raw queries
    of a router instead of the projection, an odd output width (a last row on its own) and no
    active head."""
    gen = torch.Generator().manual_seed(hd)
    H, G, S, D, Dout = 6, 3, 37, 24, 25
    cache_k = torch.randn(G, S + 5, hd, generator=gen)
    cache_v = torch.randn(G, S + 5, hd, generator=gen)
    k, v = cache_k[:, :S], cache_v[:, :S]  # views, rows hd apart, groups (S + 5) * hd apart
    x = torch.randn(D, generator=gen)
    wq, bq = torch.randn(H * hd, D, generator=gen) * 0.2, torch.randn(H * hd, generator=gen)
    wo, bo = torch.randn(Dout, H * hd, generator=gen), torch.randn(Dout, generator=gen)
    active = torch.tensor([True, False, False, True, True, False])
    gates = torch.rand(H, generator=gen) + 0.5
    mask = torch.rand(S, generator=gen) > 0.4
    norm = (torch.rand(hd, generator=gen) + 0.5, 1e-6)
    angle = torch.rand(hd // 2, generator=gen) * 6
    rope = (torch.cat([angle, angle]).cos(), torch.cat([angle, angle]).sin())
    raw = torch.randn(H, hd, generator=gen)

    def ref(mask, bias, q_norm, rope, raw):
        q = (wq @ x + (bq if bias else 0)).view(H, hd) if raw is None else raw
        if q_norm is not None:
            q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + q_norm[1]) * q_norm[0]
        if rope is not None:
            q = q * rope[0] + torch.cat([-q[:, hd // 2:], q[:, :hd // 2]], -1) * rope[1]
        out = bo.clone() if bias else torch.zeros(Dout)
        for h in active.nonzero()[:, 0].tolist():
            s = (k[h // 2] @ q[h]) * 0.3
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            p = torch.softmax(s, -1).nan_to_num(0.0)  # a head that sees no key: 0
            out += wo[:, h * hd:(h + 1) * hd] @ (p @ v[h // 2]) * gates[h]
        return out

    with num_threads(threads):
        cases = [(m, False, None, None, None) for m in (None, mask, torch.zeros(S, dtype=torch.bool))]
        cases += [(mask, True, norm, rope, None), (None, True, norm, None, raw), (None, False, None, rope, raw)]
        for m, bias, q_norm, rp, rq in cases:
            got = cpu_kernels.decode_token(x, wq, bq if bias else None, active, gates, k, v, m, 0.3, wo,
                                           bo if bias else None, raw_queries=rq, q_norm=q_norm, rope=rp)
            torch.testing.assert_close(got, ref(m, bias, q_norm, rp, rq), atol=1e-4, rtol=1e-5)
        none = cpu_kernels.decode_token(x, wq, None, torch.zeros(H, dtype=torch.bool), gates, k, v, None, 0.3, wo, bo)
        assert torch.equal(none, bo)
    with pytest.raises(TypeError, match="float64"):
        cpu_kernels.decode_token(x.double(), wq, None, active, gates, k, v, None, 0.3, wo)
    with pytest.raises(ValueError, match=r"q_weight \(\d+, 25\)"):
        cpu_kernels.decode_token(x, torch.randn(H * hd, D + 1), None, active, gates, k, v, None, 0.3, wo)
    with pytest.raises(ValueError, match="active must be bool"):
        cpu_kernels.decode_token(x, wq, None, active.float(), gates, k, v, None, 0.3, wo)
    with pytest.raises(ValueError, match="G dividing the 6 heads"):
        cpu_kernels.decode_token(x, wq, None, active, gates, torch.randn(4, S, hd), torch.randn(4, S, hd), None, 0.3, wo)
    with pytest.raises(ValueError, match="key_mask"):
        cpu_kernels.decode_token(x, wq, None, active, gates, k, v, mask[:-1], 0.3, wo)
    with pytest.raises(ValueError, match="raw_queries"):
        cpu_kernels.decode_token(x, wq, None, active, gates, k, v, None, 0.3, wo, raw_queries=raw[:3])


LAYERS = [  # MoHAttention settings of a decoded token through the sparse backend's CPU decode path
    dict(num_heads=6, num_shared=1, top_k=2),
    dict(num_heads=6, num_kv_heads=3, num_shared=2, top_k=1, rope=True, qk_norm=True, qkv_bias=True, out_bias=True),
    dict(num_heads=4, num_shared=1, top_k=2, router="query_norm", rope=True),  # the router made the raw queries
    dict(num_heads=4, num_shared=0, top_k=4, router="two_stage"),  # every head
    # a qk-norm module the kernel does not compute itself: run on the raw queries before it
    dict(num_heads=6, num_shared=1, top_k=2, rope=True, qk_norm=True, q_norm_module=lambda: torch.nn.LayerNorm(8)),
]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kw", LAYERS, ids=["plain", "gqa-rope-norm-bias", "query_norm", "all-routed", "other-qnorm"])
def test_decode_step_through_the_layer_matches_reference(kw, masked):
    from moh.backends.sparse import backend as sparse_backend
    from moh.config import MoHConfig
    from moh.core.attention import MoHAttention
    from moh.core.cache import KVCache

    torch.manual_seed(0)
    kw = dict(kw)
    q_norm_module = kw.pop("q_norm_module", None)
    m = MoHAttention(MoHConfig(dim=16, head_dim=8, causal=True, **kw)).eval()
    if q_norm_module is not None:
        m.q_norm = q_norm_module()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    prefix, x = torch.randn(1, 9, 16), torch.randn(1, 3, 16)
    mask = (torch.rand(1, 12) > 0.3) if masked else None
    used = []
    original = sparse_backend._one_token_cpu

    def spy(call, weights):
        used.append(True)
        return original(call, weights)

    outs = {}
    for backend in ("reference", "sparse"):
        m.set_backend(backend)
        cache = KVCache(capacity=4)
        steps = []
        with torch.no_grad():
            m(prefix, None if mask is None else mask[:, :9], cache)
            for t in range(3):  # three decode steps
                sparse_backend._one_token_cpu = spy
                try:
                    steps.append(m(x[:, t:t + 1], None if mask is None else mask[:, :10 + t], cache).output)
                finally:
                    sparse_backend._one_token_cpu = original
        outs[backend] = torch.cat(steps, 1)
    assert len(used) == 3  # the sparse steps took the CPU decode path
    torch.testing.assert_close(outs["sparse"], outs["reference"], atol=1e-5, rtol=1e-5)


def test_decode_path_not_taken_when_gradients_are_needed():
    """The decode kernels have no backward: with autograd on, a step takes the torch path and its
    gradients reach the weights."""
    from moh.config import MoHConfig
    from moh.core.attention import MoHAttention
    from moh.core.cache import KVCache

    torch.manual_seed(0)
    m = MoHAttention(MoHConfig(dim=16, head_dim=8, num_heads=4, num_shared=1, top_k=2, causal=True))
    cache = KVCache(capacity=8)
    with torch.no_grad():
        m(torch.randn(1, 5, 16), cache=cache)
    m(torch.randn(1, 1, 16), cache=cache).output.sum().backward()
    assert m.q_proj.weight.grad is not None and m.q_proj.weight.grad.abs().sum() > 0


def test_unwritable_cache_builds_in_a_temporary_directory(fresh, monkeypatch, tmp_path_factory):
    """A cache directory it may not write (a read-only home; simulated: the tests run as root,
    which ignores file modes) -> the library is built in a per-user temporary directory."""
    tmp = tmp_path_factory.mktemp("tmp")
    monkeypatch.setattr(cpu_kernels.tempfile, "tempdir", str(tmp))
    real_access = os.access
    monkeypatch.setattr(cpu_kernels.os, "access", lambda p, mode: False if str(p) == str(fresh) else real_access(p, mode))
    assert cpu_kernels.available()
    assert os.listdir(fresh) == []
    built = list((tmp / f"moh-kernels-{os.getuid()}").iterdir())
    assert len(built) == 1 and built[0].name.startswith("cpu_kernels-")


# ---------------------------------------------------------------------------------------------
# the two-stage router for a few tokens


@pytest.mark.parametrize("shared,top_k", [(0, 2), (1, 3), (2, 1), (2, 4), (3, 6)])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("threads", [1, 2])  # from 256 tokens on the C++ router splits them over threads
def test_two_stage_router_fast_path_matches_the_torch_path(shared, top_k, ties, threads):
    """Inputs without autograd take moh's C++ router (decode-sized: all of it; more than 16
    tokens: after one product for the logits); with autograd the torch operations run: same
    gates, active heads and probabilities, also when every routed logit is equal (zero weights:
    ties go to the lower index in both)."""
    from moh.config import MoHConfig
    from moh.core import routers

    torch.manual_seed(shared * 10 + top_k)
    r = routers.build_router(MoHConfig(dim=24, num_heads=shared + 6, head_dim=4, num_shared=shared, top_k=top_k))
    if ties:
        with torch.no_grad():
            r.w_routed.weight.zero_()
    calls = []
    real = cpu_kernels.two_stage_router
    for shape in [(1, 1, 24), (3, 1, 24), (2, 5, 24), (2, 40, 24), (2, 300, 24)]:
        x = torch.randn(shape)
        cpu_kernels.two_stage_router = lambda *a, **kw: calls.append(kw["logits"] is not None) or real(*a, **kw)
        try:
            with torch.no_grad(), num_threads(threads):
                fast = r(x, None)
        finally:
            cpu_kernels.two_stage_router = real
        slow = r(x, None)  # autograd on, weights require grad: the torch path
        assert torch.equal(fast.active_BTH, slow.active_BTH)
        torch.testing.assert_close(fast.gates_BTH, slow.gates_BTH.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(fast.probs_BTE, slow.probs_BTE.detach(), atol=1e-6, rtol=1e-5)
        assert fast.learned and fast.num_shared == shared
        if ties:  # the lowest top_k routed heads
            assert fast.active_BTH[..., shared:shared + top_k].all() and not fast.active_BTH[..., shared + top_k:].any()
    assert calls == [False, False, False, True, True]  # logits from one product from 80 tokens on


def test_two_stage_router_bad_inputs_are_named():
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="top_k=5"):
        cpu_kernels.two_stage_router(x, w, None, 1, None, 5)
    with pytest.raises(ValueError, match=r"\(3, 8\)"):
        cpu_kernels.two_stage_router(x, w, torch.randn(3, 8), 2, None, 2)
    with pytest.raises(ValueError, match=r"logits \(1, 5\) must be \(1, 6\)"):
        cpu_kernels.two_stage_router(x, w, None, 1, torch.randn(2, 8), 2, logits=torch.randn(1, 5))


# ---------------------------------------------------------------------------------------------
# per-head products of gathered rows (the projections of the sparse backend)


def _pieces(gen, n, D, H, hd, counts):
    rows = [torch.randperm(n, generator=gen)[:c].sort().values for c in counts]
    rows[0] = torch.cat([rows[0], rows[0][-1:].repeat(3)])  # padding: the last row repeated
    return rows


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("blocks", [(64, 32), (7, 5), (1000, 1000)])  # token block, rows per product
@pytest.mark.parametrize("tiles", [True, False])  # moh's register tiles, or sgemm on gathered rows
def test_scatter_mm_matches_index_add(threads, blocks, tiles):
    """Rows pieces (weight blocks read in place as transposed column slices, and row slices),
    an every-row piece, repeated (padding) rows, a piece with no rows, factors per row (strided),
    out zeroed or added to."""
    gen = torch.Generator().manual_seed(threads)
    n, D, H, hd = 150, 40, 5, 12
    W = torch.randn(D, H * hd, generator=gen)  # like W_O: head h is W[:, h*hd:(h+1)*hd]
    Wq = torch.randn(H * hd, D, generator=gen)  # like W_Q: head h is Wq[h*hd:(h+1)*hd]
    rows = _pieces(gen, n, D, H, hd, [60, 1, 149, 0])
    pieces = [(r, torch.randn(r.numel(), hd, generator=gen), (W[:, h * hd:(h + 1) * hd].t() if h % 2 else
                                                            Wq[h * hd:(h + 1) * hd])) for h, r in enumerate(rows)]
    pieces.append((None, torch.randn(n, 2 * hd, generator=gen), W[:, 3 * hd:5 * hd].t()))
    # a factor per row (router gates: a strided view), on a rows piece and on an every-row piece
    gates = torch.rand(n, 3, generator=gen)
    pieces.append((rows[0], torch.randn(rows[0].numel(), hd, generator=gen), Wq[:hd], gates[: rows[0].numel(), 1]))
    pieces.append((None, torch.randn(n, hd, generator=gen), W[:, :hd].t(), gates[:, 2]))
    start = torch.randn(n, D, generator=gen)
    ref = start.clone()
    for r, a, b, *scale in pieces:
        ref.index_add_(0, torch.arange(n) if r is None else r, (a @ b) * (scale[0][:, None] if scale else 1))
    with torch.no_grad(), num_threads(threads):
        tb, mb = blocks
        torch.testing.assert_close(cpu_kernels.scatter_mm(start.clone(), pieces, tblock=tb, mblock=mb, tiles=tiles),
                                   ref)
        torch.testing.assert_close(cpu_kernels.scatter_mm(start.clone(), pieces, zero=True, tblock=tb, mblock=mb,
                                                          tiles=tiles), ref - start)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("blocks", [(64, 32), (7, 5), (1000, 1000)])
@pytest.mark.parametrize("num_pieces", [1, 4])  # fewer pieces than threads: row blocks in parallel
@pytest.mark.parametrize("tiles", [True, False])
def test_gather_mm_matches_index_select(threads, blocks, num_pieces, tiles):
    """Products of gathered rows with weight blocks read in place, weight gradients added into
    (k, D) row slices and transposed (D, k) column slices, every-row pieces, preallocated outputs;
    pieces with a weight gradient and products only (these take the register tiles)."""
    gen = torch.Generator().manual_seed(7 + num_pieces)
    n, D, H, hd = 130, 36, 5, 10
    x = torch.randn(n, D, generator=gen)
    W = torch.randn(D, H * hd, generator=gen)
    Wq = torch.randn(H * hd, D, generator=gen)
    rows = _pieces(gen, n, D, H, hd, [50, 129, 3])[:num_pieces - 1] + [None]
    g_rows, g_cols = torch.randn(H * hd, D, generator=gen), torch.randn(D, H * hd, generator=gen)
    want_rows, want_cols = g_rows.clone(), g_cols.clone()
    pieces, refs = [], []
    for h, r in enumerate(rows):
        xr = x if r is None else x[r]
        e = torch.randn(xr.shape[0], hd, generator=gen)
        cols = slice(h * hd, (h + 1) * hd)
        if h % 2:
            pieces.append((r, W[:, cols], e, g_cols[:, cols].t()))
            refs.append(xr @ W[:, cols])
            want_cols[:, cols] += xr.t() @ e
        else:
            pieces.append((r, Wq[cols].t(), e, g_rows[cols]))
            refs.append(xr @ Wq[cols].t())
            want_rows[cols] += e.t() @ xr
    out = [None] + [torch.empty(ref.shape) for ref in refs[1:]]
    with torch.no_grad(), num_threads(threads):
        tb, mb = blocks
        got = cpu_kernels.gather_mm(x, pieces, tblock=tb, mblock=mb, out=out, tiles=tiles)
        products = cpu_kernels.gather_mm(x, [(r, b, None, None) for r, b, _, _ in pieces], tblock=tb, mblock=mb,
                                         tiles=tiles)
    for g, p, ref in zip(got, products, refs):
        torch.testing.assert_close(p, ref)
        torch.testing.assert_close(g, ref)
    assert all(g is o for g, o in zip(got[1:], out[1:]))
    torch.testing.assert_close(g_rows, want_rows)
    torch.testing.assert_close(g_cols, want_cols)
    # products only, gradients only
    assert cpu_kernels.gather_mm(x, [(rows[0], Wq[:hd].t(), None, None)])[0].shape == (x.shape[0] if rows[0] is None
                                                                                       else rows[0].numel(), hd)
    before = g_rows.clone()
    assert cpu_kernels.gather_mm(x, [(None, None, torch.ones(n, hd), g_rows[:hd])]) == [None]
    torch.testing.assert_close(g_rows[:hd], before[:hd] + x.sum(0).expand(hd, D))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("width", [64, 80, 77, 20])  # one tile of 4 vectors; 3 + 1 vectors; + scalar tail; tail only
def test_register_tiles_match_reference(threads, width):
    """The register tiles at the widths they treat apart: output widths of 4 vectors (6-row tiles),
    3 + 1 vectors (8-row tiles), a scalar tail, with row counts that leave every tile height
    from 1 to 8 at a piece's end; weight blocks stored both ways; an every-row first piece writing a
    zeroed output (no fill) and a rows first piece (filled first); against plain products."""
    gen = torch.Generator().manual_seed(width + threads)
    n, D = 61, 96
    x = torch.randn(n, D, generator=gen)
    counts = [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 60]
    rows = [torch.randperm(n, generator=gen)[:c].sort().values for c in counts]
    # gather: x[rows] @ b, b (D, width) stored (D, width) or as the transpose of (width, D)
    bs = [torch.randn(D, width, generator=gen) if i % 2 else torch.randn(width, D, generator=gen).t()
          for i in range(len(rows))]
    # scatter: out (n, width)[rows] += a @ b, b (k, width) stored either way, k = 16 or 24
    ks = [16 if i % 3 else 24 for i in range(len(rows))]
    a_s = [torch.randn(c, k, generator=gen) for c, k in zip(counts, ks)]
    sb = [torch.randn(k, width, generator=gen) if i % 2 else torch.randn(width, k, generator=gen).t()
          for i, k in enumerate(ks)]
    every = (None, torch.randn(n, 8, generator=gen), torch.randn(width, 8, generator=gen).t())
    with torch.no_grad(), num_threads(threads):
        got = cpu_kernels.gather_mm(x, [(r, b, None, None) for r, b in zip(rows, bs)], tblock=16, tiles=True)
        for g, r, b in zip(got, rows, bs):
            torch.testing.assert_close(g, x[r] @ b)
        for first in ("every", "rows"):
            # every other piece with a factor per row (a strided view, as the router's gates)
            pieces = [(r, a, b) if i % 2 else (r, a, b, torch.rand(r.numel(), 2, generator=gen)[:, 1])
                      for i, (r, a, b) in enumerate(zip(rows, a_s, sb))]
            pieces = [every] + pieces if first == "every" else pieces + [every]
            ref = torch.zeros(n, width)
            for r, a, b, *scale in pieces:
                ref.index_add_(0, torch.arange(n) if r is None else r, (a @ b) * (scale[0][:, None] if scale else 1))
            out = torch.full((n, width), float("nan"))  # zero=True must not read what was there
            torch.testing.assert_close(cpu_kernels.scatter_mm(out, pieces, zero=True, tblock=16, tiles=True), ref)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("width", [64, 80, 77, 20])
def test_weight_gradient_tiles_match_reference(threads, width):
    """Weight gradients by register tiles (rank-1 updates over the gathered rows, x's rows read
    where they lie): (width, D) row blocks (E^T X) and transposed (D, width) column blocks (X^T E),
    at the widths the tiles treat apart, row counts that leave every tile height and more rows
    than one chunk of 128 in a block, every-row pieces; with tiles and with sgemm, against plain
    products. Also with products in the same pieces (the output projection's backward)."""
    gen = torch.Generator().manual_seed(width * 3 + threads)
    n, D = 300, 96
    x = torch.randn(n, D, generator=gen)
    counts = [1, 5, 7, 13, 260]
    rows = [torch.randperm(n, generator=gen)[:c].sort().values for c in counts] + [None]
    for tiles in (True, False):
        g_rows, g_cols = torch.randn(width, D, generator=gen), torch.randn(D, width, generator=gen)
        want_rows, want_cols = g_rows.clone(), g_cols.clone()
        pieces, products = [], []
        for i, r in enumerate(rows):
            xr = x if r is None else x[r]
            e = torch.randn(xr.shape[0], width, generator=gen)
            b = torch.randn(D, width, generator=gen) if i % 2 else None
            if i % 2:
                want_cols += xr.t() @ e
                pieces.append((r, b, e, g_cols.t()))
            else:
                want_rows += e.t() @ xr
                pieces.append((r, b, e, g_rows))
            products.append(None if b is None else xr @ b)
        with torch.no_grad(), num_threads(threads):
            got = cpu_kernels.gather_mm(x, pieces, tblock=512 if threads == 1 else 64, tiles=tiles)
        torch.testing.assert_close(g_rows, want_rows, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(g_cols, want_cols, rtol=1e-4, atol=1e-4)
        for g, p in zip(got, products):
            assert (g is None) == (p is None)
            if p is not None:
                torch.testing.assert_close(g, p)


def test_gathered_products_bad_inputs_are_named():
    x, w = torch.randn(10, 8), torch.randn(8, 4)
    out = torch.zeros(10, 8)
    with pytest.raises(ValueError, match="ascending"):
        cpu_kernels.scatter_mm(out, [(torch.tensor([3, 1]), torch.randn(2, 4), w.t())])
    with pytest.raises(ValueError, match=r"in \[0, 10\), got \[1, 10\]"):
        cpu_kernels.scatter_mm(out, [(torch.tensor([1, 10]), torch.randn(2, 4), w.t())])
    with pytest.raises(ValueError, match=r"must be \(m, k\) and \(k, 8\)"):
        cpu_kernels.scatter_mm(out, [(None, torch.randn(10, 4), w)])
    with pytest.raises(ValueError, match="all n=10 rows"):
        cpu_kernels.scatter_mm(out, [(None, torch.randn(9, 4), w.t())])
    with pytest.raises(TypeError, match="fp32"):
        cpu_kernels.gather_mm(x.double(), [(None, w, None, None)])
    with pytest.raises(ValueError, match="unit stride in one dimension"):
        cpu_kernels.gather_mm(x, [(None, torch.randn(100).as_strided((8, 4), (2, 3)), None, None)])
    with pytest.raises(ValueError, match="nothing to compute"):
        cpu_kernels.gather_mm(x, [(None, None, None, None)])
    assert torch.equal(out, torch.zeros(10, 8))  # nothing written by a rejected call


def test_decode_step_runs_no_more_torch_operations_than_sdpa_attention():
    """The issue counted ~180 small operations per layer in a decode step against ~30 for SDPA
    multi-head attention; the one-call CPU decode path keeps a step of the bench's layer (50% heads,
    two-stage router, 1k cache) at or below SDPA's count (26 against 33 when written)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from moh.core.cache import KVCache
    from moh.eval.bench import DenseMHA, build_moh

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    def step_ops(layer):
        torch.manual_seed(0)
        cache, x = KVCache(capacity=1100), torch.randn(1, 1, 96)
        with torch.no_grad():
            layer(torch.randn(1, 1024, 96), cache=cache)
            with Count() as c:
                layer(x, cache=cache)
        return c.ops

    sparse, sdpa = step_ops(build_moh(96, 12, 8, 0.5, "sparse", True)), step_ops(DenseMHA(96, 12, 8, True))
    assert len(sparse) <= len(sdpa), (len(sparse), len(sdpa), sparse)


def test_decode_token_reads_strided_active_flags_and_mask_as_their_values():
    """Views with gaps (every other element of a longer tensor) are taken for what they hold, not
    for the memory under their first element; a cache of the wrong rank is named."""
    gen = torch.Generator().manual_seed(11)
    H, S, hd, D = 4, 9, 16, 12
    k, v = torch.randn(H, S, hd, generator=gen), torch.randn(H, S, hd, generator=gen)
    x, wq, wo = torch.randn(D, generator=gen), torch.randn(H * hd, D, generator=gen), torch.randn(D, H * hd, generator=gen)
    gates = torch.rand(H, generator=gen)
    active = torch.tensor([True, False, False, True])
    mask = torch.rand(S, generator=gen) > 0.3
    wide_active = torch.stack([active, ~active], 1).reshape(-1)[::2]  # == active, stride 2
    wide_mask = torch.stack([mask, ~mask], 1).reshape(-1)[::2]
    assert wide_active.stride() == (2,) and torch.equal(wide_active, active) and torch.equal(wide_mask, mask)
    want = cpu_kernels.decode_token(x, wq, None, active, gates, k, v, mask, 0.25, wo)
    torch.testing.assert_close(cpu_kernels.decode_token(x, wq, None, wide_active, gates, k, v, wide_mask, 0.25, wo), want,
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"k must be \(G, S, hd\).*\(1, 4, 9, 16\)"):
        cpu_kernels.decode_token(x, wq, None, active, gates, k[None], v[None], None, 0.25, wo)


@pytest.mark.parametrize("threads", [1, 2])
def test_head_rows_kernel_matches_torch_operations(threads, monkeypatch):
    """The rows of partially used heads from moh's CPU kernel (``head_rows``) against the torch
    operations they replace: tokens ascending and padded with T - 1, validity, flat indices,
    positions (strided), and the rows' gates with their gradient (by the kernel's gate index);
    several items, uneven and zero counts, a strided (non-contiguous) active tensor, and enough
    tokens for the kernel to split items and heads over threads."""
    from moh.backends.sparse import rows as rows_mod

    gen = torch.Generator().manual_seed(threads)
    cases = [(3, 50, 7), (1, 1, 4), (2, 70000, 12)]  # the last: B * P * T >= 2^20, threaded
    for B, T, H in cases:
        active = torch.rand(B, T, H + 2, generator=gen) < 0.4
        active = active[..., 1:H + 1]  # strided items and tokens, unit last stride
        active[0, :, 0] = False  # a head no token of item 0 uses
        heads = [0, 2, 3, H - 1]
        M = max(max(int(active[b, :, h].sum()) for b in range(B) for h in heads), 1)
        positions = (torch.arange(T) * 3 + 5).expand(B, T)  # strides (0, 1)
        gates = torch.rand(B, T, H + 1, generator=gen).requires_grad_()
        gates_BTH = gates[..., :H]  # a strided view
        with num_threads(threads):
            got = rows_mod.gather_rows(active, heads, M, positions)
            got_gates = rows_mod.row_gates(gates_BTH, got)
        assert got.gate_index_BPM is not None  # the kernel ran
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
        want = rows_mod.gather_rows(active, heads, M, positions)
        monkeypatch.undo()
        assert want.gate_index_BPM is None
        want_gates = rows_mod.row_gates(gates_BTH, want)
        for name in ("tokens_BPM", "valid_BPM", "flat_BPM", "positions_BPM"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert torch.equal(got_gates, want_gates)
        w = torch.randn(got_gates.shape, generator=gen)
        g1, = torch.autograd.grad((got_gates * w).sum(), gates, retain_graph=True)
        g2, = torch.autograd.grad((want_gates * w).sum(), gates)
        assert torch.equal(g1, g2)
        narrow = got.narrow(1, 2, M)
        assert torch.equal(narrow.gate_index_BPM, got.gate_index_BPM[:, 1:3])
    positions = torch.zeros(1, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="heads"):
        cpu_kernels.head_rows(torch.zeros(1, 4, 3, dtype=torch.bool), [3], 2, positions)
    with pytest.raises(ValueError, match="bool"):
        cpu_kernels.head_rows(torch.zeros(1, 4, 3), [0], 2, positions)
    with pytest.raises(ValueError, match="positions"):
        cpu_kernels.head_rows(torch.zeros(1, 4, 3, dtype=torch.bool), [0], 2, positions.int())
