"""Every backend equals ``reference``: outputs (<= 1e-5) and gradients (<= 1e-4), fp32.

Property-based over shapes, head splits, routers, causal / bidirectional, padding masks, GQA,
RoPE, qk-norm and the KV cache. ``sparse`` runs twice per case: with the CPU kernels, and with the
kernel choice forced to a non-CPU device (the portable kernels every other device uses). Its
tuning is drawn: block sizes small so that the blocked causal paths run with several blocks even
on these tiny sequences, the dense-from fraction so that partially used heads run both gathered
and whole.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moh.backends import BACKENDS
from moh.backends.sparse import SparseBackend, kernels
from moh.backends.sparse.tuning import CPU, CUDA, replace
from moh.config import MoHConfig
from moh.core.attention import MoHAttention
from moh.core.cache import KVCache

FAST_BACKENDS = [b for b in BACKENDS.names() if b != "reference"]
# the sparse backend with its kernel choice forced to a CUDA-like device, on CPU tensors (no Triton)
PORTABLE = SparseBackend(replace(CUDA, triton=False), device="cuda")


@pytest.fixture(autouse=True, scope="module")
def test_backends():
    """Test-only backends, registered while this module's tests run (other modules iterate over
    BACKENDS): the portable sparse path, and per hypothesis case sparse with drawn tuning."""
    BACKENDS.register("sparse_portable", overwrite=True)(PORTABLE)
    yield
    for name in ("sparse_portable", "sparse_case", "sparse_case_portable"):
        if name in BACKENDS:
            BACKENDS.unregister(name)


def build(seed: int, **kw) -> MoHAttention:
    """A layer with every parameter random (norm weights and biases too, so none is trivially 1/0)."""
    torch.manual_seed(seed)
    m = MoHAttention(MoHConfig(**kw))
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    return m


def make_mask(kind: str, B: int, T: int, S: int, gen: torch.Generator):
    if kind == "none":
        return None
    if kind == "bts":
        return torch.rand(B, T, S, generator=gen) > 0.3
    keep = torch.rand(B, S, generator=gen) > 0.3
    if kind == "bs_int":
        return keep.long()
    return keep


def run(m: MoHAttention, backend: str, x, mask, prefix=None, prefix_mask=None):
    """Output and gradients (x and every parameter) of one call; with ``prefix``, the call runs
    after a cache was filled with it (the cache holds keys/values without gradient)."""
    m.set_backend(backend)
    m.zero_grad(set_to_none=True)
    cache = None
    if prefix is not None:
        cache = KVCache(capacity=2)  # small: forces the buffer to grow
        with torch.no_grad():
            m(prefix, prefix_mask, cache)
    x = x.detach().clone().requires_grad_(True)
    out = m(x, mask, cache).output
    w = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * w).sum().backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    return out.detach(), grads


def assert_same(m, x, mask, prefix=None, prefix_mask=None, backends=None):
    """Every backend's output and gradients equal the reference's. The fp32 reference has rounding
    errors of its own (outputs of magnitude ~10 here: up to ~5e-6), so two fp32 results can differ
    by twice that; a backend that misses the fp32 reference is held against the reference computed
    in float64 instead, with the same tolerances."""
    ref_out, ref_grads = run(m, "reference", x, mask, prefix, prefix_mask)
    exact = []  # the float64 reference, made when first needed

    def check(got, want, name, atol, backend):
        if torch.allclose(got, want, atol=atol, rtol=atol):
            return
        if not exact:
            m64 = copy.deepcopy(m).double()
            exact.append(run(m64, "reference", x.double(), mask, None if prefix is None else prefix.double(), prefix_mask))
        want64 = exact[0][0] if name == "output" else exact[0][1][name]
        torch.testing.assert_close(got.double(), want64, atol=atol, rtol=atol, msg=lambda s: f"{backend} {name}: {s}")

    for backend in backends or FAST_BACKENDS + ["sparse_portable"]:
        out, grads = run(m, backend, x, mask, prefix, prefix_mask)
        check(out, ref_out, "output", 1e-5, backend)
        assert grads.keys() == ref_grads.keys(), backend
        for name, g in grads.items():
            check(g, ref_grads[name], name, 1e-4, backend)


@st.composite
def cases(draw):
    G = draw(st.sampled_from([1, 2, 3]))
    H = G * draw(st.sampled_from([1, 2, 3]))
    router = draw(st.sampled_from(["two_stage", "query_norm", "all"]))
    shared = draw(st.integers(0, H))
    top_k = draw(st.integers(0 if shared else 1, H - shared)) if shared < H else 0
    head_dim = draw(st.sampled_from([2, 4, 6]))
    cfg = dict(
        dim=draw(st.sampled_from([6, 8])), num_heads=H, num_kv_heads=G, head_dim=head_dim,
        num_shared=shared, top_k=top_k, router=router, causal=draw(st.booleans()),
        rope=draw(st.booleans()), qk_norm=draw(st.booleans()), qkv_bias=draw(st.booleans()),
        out_bias=draw(st.booleans()),
    )
    return dict(
        cfg=cfg, B=draw(st.integers(1, 3)), T=draw(st.integers(1, 9)), P=draw(st.sampled_from([0, 0, 1, 5])),
        mask=draw(st.sampled_from(["none", "bs", "bs_int", "bts"])),
        row_block=draw(st.sampled_from([1, 3, 256])), flash_grid=draw(st.sampled_from([1, 2, 5, 128])),
        chunk_bytes=draw(st.sampled_from([1, 8 << 20])), per_sequence=draw(st.sampled_from([0, 512])),
        seed=draw(st.integers(0, 10_000)),
        dense_from=draw(st.sampled_from([0.0, 0.6, 1.01])),
        cpu_rows=draw(st.booleans()), cpu_projections=draw(st.booleans()), rows_blocks=draw(st.sampled_from([(1, 1, 1), (3, 2, 2), (128, 512, 64)])),
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_backends_match_reference(case):
    m = build(case["seed"], **case["cfg"])
    B, T, P = case["B"], case["T"], case["P"]
    gen = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(B, T, m.cfg.dim, generator=gen)
    prefix = torch.randn(B, P, m.cfg.dim, generator=gen) if P else None
    mask = make_mask(case["mask"], B, T, P + T, gen)
    # a (B, S) padding mask covers the prefix too; a (B, T, S) mask applies to the new queries only
    prefix_mask = mask[:, :P] if (P and mask is not None and mask.dim() == 2) else None
    # small blocks: several blocks even on these tiny sequences; dense_from 0 computes every used
    # head for all rows (gate 0 where unused), 1.01 gathers every partially used head; chunks of
    # one head (CPU) or of several; decode steps of a batch per sequence (0) or by shared heads;
    # causal rows with moh's CPU kernel (blocks of 1-3 rows and keys, or its defaults) or torch's;
    # the projections of gathered rows with moh's CPU kernels or torch's operations
    knobs = dict(row_block=case["row_block"], flash_block=case["row_block"], flash_grid=case["flash_grid"],
                 chunk_bytes=case["chunk_bytes"], chunk_bytes_threaded=case["chunk_bytes"], decode_per_sequence_keys=case["per_sequence"],
                 dense_from=case["dense_from"],
                 dense_from_causal=case["dense_from"], cpu_rows=case["cpu_rows"],
                 cpu_projections=case["cpu_projections"],
                 rows_block=case["rows_blocks"][0], rows_key_chunk=case["rows_blocks"][1],
                 rows_diagonal_chunk=case["rows_blocks"][2])
    BACKENDS.register("sparse_case", overwrite=True)(SparseBackend(replace(CPU, **knobs)))
    BACKENDS.register("sparse_case_portable", overwrite=True)(
        SparseBackend(replace(CUDA, triton=False, **knobs), device="cuda"))
    assert_same(m, x, mask, prefix, prefix_mask, backends=["masked", "sparse_case", "sparse_case_portable"])


@pytest.mark.parametrize("causal", [False, True])
def test_unused_heads_uneven_counts_and_single_token(causal):
    """B > 1 with very different per-head counts, a head nobody uses, and T = 1."""
    m = build(1, dim=8, num_heads=4, head_dim=4, num_shared=1, top_k=1, causal=causal)
    with torch.no_grad():  # route everything by a bias-like input feature: routed head 2 (head 3) never wins
        m.router.w_routed.weight.zero_()
        m.router.w_routed.weight[0, 0] = 5.0
        m.router.w_routed.weight[1, 0] = -5.0
        m.router.w_routed.weight[2, 0] = 0.0  # logit 0 always loses to +5
    x = torch.randn(3, 7, 8)
    x[0, :, 0] = 1.0  # item 0: every token picks routed head 0 (head 1)
    x[1, :, 0] = -1.0  # item 1: head 2
    x[2, :3, 0], x[2, 3:, 0] = 1.0, -1.0  # item 2: split
    active = m(x).routing.active_BTH
    assert not active[..., 3].any() and active[..., 1].any() and active[..., 2].any()
    assert_same(m, x, None)
    assert_same(m, x[:, :1], None)


@pytest.mark.parametrize("causal", [False, True])
def test_keys_values_split_once_for_runs_and_gathered_heads(causal, monkeypatch):
    """One head per chunk and no grouped-query attention: the whole heads' run, every gathered
    head and the unused heads between them are pieces of one split of the keys/values (its
    backward writes one gradient in the keys' own layout); outputs and gradients equal the
    reference's, with a head nobody uses among them."""
    from moh.backends.sparse import backend as sparse_backend

    m = build(2, dim=8, num_heads=5, head_dim=4, num_shared=2, top_k=1, causal=causal)
    with torch.no_grad():  # routed heads 2 and 4 split the tokens, head 3 never wins
        m.router.w_routed.weight.zero_()
        m.router.w_routed.weight[0, 0], m.router.w_routed.weight[2, 0] = 5.0, -5.0  # routed 1: logit 0, never top
    x = torch.randn(2, 9, 8)
    x[:, ::2, 0], x[:, 1::2, 0] = 1.0, -1.0
    active = m(x).routing.active_BTH
    assert active[..., 2].any() and active[..., 4].any() and not active[..., 3].any()
    splits = []
    real = sparse_backend._kv_pieces
    monkeypatch.setattr(sparse_backend, "_kv_pieces", lambda *a: splits.append(real(*a)) or splits[-1])
    BACKENDS.register("sparse_one_head_chunks", overwrite=True)(
        SparseBackend(replace(CPU, chunk_bytes=1, chunk_bytes_threaded=1, dense_from=1.01, dense_from_causal=1.01)))
    assert_same(m, x, None, backends=["sparse_one_head_chunks"])
    assert splits and all(sorted(s) == [0, 2, 3, 4] for s in splits)  # run 0-1, head 2, unused 3, head 4


def test_fully_masked_rows_give_zero_and_match():
    """A query row that may attend to nothing (left padding under causality) outputs exactly 0
    from attention in every backend (not NaN, not an average that depends on blocking)."""
    m = build(2, dim=8, num_heads=4, head_dim=4, num_shared=2, top_k=1, causal=True)
    x = torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :3] = False  # left padding: queries 0..2 of item 0 see no key
    assert_same(m, x, mask)
    for backend in BACKENDS.names():
        m.set_backend(backend)
        out = m(x, mask).output
        assert torch.isfinite(out).all()
        assert out[0, :3].abs().max() == 0, backend


@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_block_attention_backward_is_the_gradient(dropout_p):
    """The hand-written backward of the blocked causal kernel against numerical gradients (float64;
    the RNG is reseeded on every call so the dropout mask is the same)."""
    qpos = torch.tensor([[[0, 2, 3, 6, 7]]])  # (B=1, P=1, M=5) rows of a routed head

    def mask_(scores, s, e, kdiag, kend):
        if kdiag < kend:
            future = torch.arange(kdiag, kend) > qpos[..., s:e, None]
            scores[..., kdiag:kend].masked_fill_(future, torch.finfo(scores.dtype).min)

    blocks = [(0, 2, 1, 3), (2, 4, 4, 7), (4, 5, 8, 8)]  # (start, end, first masked key, keys read)

    def f(q, k, v):
        torch.manual_seed(0)
        return kernels._BlockAttention.apply(q, k, v, blocks, mask_, dropout_p)

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 3, generator=gen, dtype=torch.float64, requires_grad=True) for n in (5, 8, 8))
    assert torch.autograd.gradcheck(f, (q, k, v))


def test_flash_causal_rows_backward_is_the_gradient():
    """The flash-kernel causal path (two key parts per row block merged by log-sum-exp, backward
    through torch's flash backward with the merged statistics) against numerical gradients and
    against the plain blocked kernel."""
    qpos = torch.tensor([[[0, 2, 3, 6, 7], [1, 2, 4, 5, 7]]])  # (B=1, P=2, M=5), ascending rows per head
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 3, generator=gen, dtype=torch.float64, requires_grad=True) for n in (5, 8, 8))
    ref = torch.softmax((q @ k.transpose(-1, -2) * 0.7).masked_fill(torch.arange(8) > qpos[..., None], -1e300), -1) @ v
    # forward grids of 1, 3 (a tail block of 2 keys) and 16 (no whole block) key positions; backward
    # blocks of 2 rows: (0,2) (2,4) (4,5), one with no key before its first row
    for grid in (1, 3, 16):
        assert torch.autograd.gradcheck(lambda a, b, c: kernels.causal_flash(a, b, c, qpos, 0.7, grid, 2), (q, k, v))
        torch.testing.assert_close(kernels.causal_flash(q, k, v, qpos, 0.7, grid, 2), ref)


def test_flash_causal_rows_repeated_padding_rows():
    """Padding rows repeat a token (same query, same key index): the grid forward writes them to one
    query slot; outputs equal the reference and the gradient of the real rows is unchanged when the
    padding rows carry none (gate 0)."""
    qpos = torch.tensor([[[1, 4, 6, 9, 9, 9]]])  # the last two rows pad the row at key 9
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, n, 4, generator=gen, dtype=torch.float64, requires_grad=True) for n in (6, 10, 10))
    with torch.no_grad():
        q[:, :, 4:] = q[:, :, 3:4]
    ref = torch.softmax((q @ k.transpose(-1, -2) * 0.5).masked_fill(torch.arange(10) > qpos[..., None], -1e300), -1) @ v
    out = kernels.causal_flash(q, k, v, qpos, 0.5, 4, 2)
    torch.testing.assert_close(out, ref)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    w[:, :, 4:] = 0
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


def test_plan_chunks_by_thread_count():
    """CPU: one gathered head per chunk on one thread, several per chunk with more threads
    (``chunk_bytes_threaded``), in multiples of the thread count; full and unused heads alike."""
    from moh.backends.sparse.plan import make_plan

    T, D = 2048, 768
    counts = [[T, T, 0] + [800 + 10 * h for h in range(9)]]  # 2 full heads, 1 unused, 9 gathered
    kw = dict(T=T, S=T, D=D, causal=True, element_size=4, tuning=CPU)
    one = make_plan(counts, threads=1, **kw)
    two = make_plan(counts, threads=2, **kw)
    assert one.full == two.full == [(0, 2)]
    assert [heads for heads, _ in one.partial] == [[h] for h in range(3, 12)]
    sizes = [len(heads) for heads, _ in two.partial]
    assert sum(sizes) == 9 and max(sizes) > 1 and all(n % 2 == 0 for n in sizes[:-1]), sizes
    assert [h for heads, _ in two.partial for h in heads] == list(range(3, 12))
    assert all(M == max(counts[0][h] for h in heads) for heads, M in two.partial)
    with pytest.raises(ValueError, match="chunk_bytes_threaded=0"):
        replace(CPU, chunk_bytes_threaded=0)
