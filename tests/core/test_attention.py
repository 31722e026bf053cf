"""MoHAttention: the ``all`` router is multi-head attention, the KV cache equals a full forward,
invalid input raises one ValueError, dropout behaves."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moh.backends import BACKENDS
from moh.config import MoHConfig
from moh.core.attention import MoHAttention, set_backend
from moh.core.cache import KVCache


def layer(seed=0, **kw) -> MoHAttention:
    torch.manual_seed(seed)
    return MoHAttention(MoHConfig(**kw))


def sdpa_mha(m: MoHAttention, x, causal: bool):
    """Multi-head attention written independently from the module's q/k/v/o weights."""
    B, T, _ = x.shape
    H, G, hd = m.cfg.num_heads, m.cfg.num_kv_heads, m.cfg.head_dim
    q = m.q_proj(x).view(B, T, H, hd).transpose(1, 2)
    k = m.k_proj(x).view(B, T, G, hd).transpose(1, 2).repeat_interleave(H // G, dim=1)
    v = m.v_proj(x).view(B, T, G, hd).transpose(1, 2).repeat_interleave(H // G, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return m.o_proj(o.transpose(1, 2).reshape(B, T, H * hd))


@pytest.mark.parametrize("backend", BACKENDS.names())
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_all_router_is_sdpa_mha(backend, causal, kv_heads):
    m = layer(dim=32, num_heads=4, num_kv_heads=kv_heads, router="all", backend=backend, causal=causal,
              qkv_bias=True, out_bias=True)
    x = torch.randn(2, 11, 32)
    torch.testing.assert_close(m(x).output, sdpa_mha(m, x, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS.names())
def test_two_stage_with_uniform_router_is_mha(backend):
    """Zero router weights and top_k = E: every gate is exactly 1, so the layer is MHA."""
    m = layer(dim=24, num_heads=6, num_shared=2, router="two_stage", backend=backend, causal=True)
    for p in m.router.parameters():
        torch.nn.init.zeros_(p)
    x = torch.randn(2, 9, 24)
    out = m(x)
    assert torch.equal(out.routing.gates_BTH, torch.ones(2, 9, 6))
    torch.testing.assert_close(out.output, sdpa_mha(m, x, True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS.names())
@pytest.mark.parametrize("router", ["two_stage", "query_norm"])
@pytest.mark.parametrize("chunks", [[1] * 9, [4, 1, 3, 1]])
def test_cache_equals_full_forward(backend, router, chunks):
    """Decoding token by token, or in chunks, with the cache gives the full forward's outputs
    (causal, GQA, RoPE, qk-norm, left padding)."""
    m = layer(dim=16, num_heads=4, num_kv_heads=2, num_shared=1, top_k=2, router=router, backend=backend,
              causal=True, rope=True, qk_norm=True).eval()
    x = torch.randn(2, sum(chunks), 16)
    pad = torch.ones(2, x.shape[1], dtype=torch.long)
    pad[1, :2] = 0
    full = m(x, pad).output
    cache, outs, t = KVCache(capacity=3), [], 0
    for n in chunks:
        outs.append(m(x[:, t : t + n], pad[:, : t + n], cache).output)
        t += n
    assert cache.length == x.shape[1]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_cache_rejects_other_batch():
    m = layer(dim=8, num_heads=2, causal=True)
    cache = KVCache()
    m(torch.randn(2, 3, 8), cache=cache)
    with pytest.raises(ValueError, match="cache holds"):
        m(torch.randn(3, 1, 8), cache=cache)


# ---- invalid configurations and inputs ----------------------------------------------------


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(dim=8, num_heads=4, num_shared=1, top_k=4), "top_k=4"),
        (dict(dim=8, num_heads=4, num_kv_heads=3), "num_kv_heads=3"),
        (dict(dim=8, num_heads=4, router="nope"), "'nope'"),
        (dict(dim=8, num_heads=4, backend="nope"), "'nope'"),
        (dict(dim=10, num_heads=4), "dim=10"),
        (dict(dim=8, num_heads=4, num_shared=5), "num_shared=5"),
        (dict(dim=8, num_heads=4, dropout=1.0), "dropout=1.0"),
        (dict(dim=8, num_heads=2, head_dim=3, rope=True), "head_dim=3"),
        (dict(dim=8, num_heads=4, num_shared=1, top_k=2.5), "top_k=2.5"),
        (dict(dim=8, num_heads=4, top_k="2"), "top_k='2'"),
        (dict(dim=8.0, num_heads=4), "dim=8.0"),
        (dict(dim=8, num_heads=True), "num_heads=True"),
        (dict(dim=8, num_heads=2, rope=True, rope_theta=0.0), "rope_theta=0.0"),
        (dict(dim=8, num_heads=2, rope=True, rope_theta=-1), "rope_theta=-1"),
        (dict(dim=8, num_heads=2, causal="yes"), "causal='yes'"),
        (dict(dim=8, num_heads=2, router=None), "router=None"),
    ],
)
def test_invalid_config_raises(kw, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        MoHConfig(**kw)


def test_unknown_names_list_valid_choices():
    with pytest.raises(ValueError, match="valid choices.*'all'.*'query_norm'.*'two_stage'"):
        MoHConfig(dim=8, num_heads=4, router="nope")
    m = layer(dim=8, num_heads=2)
    with pytest.raises(ValueError, match="valid choices.*'masked'.*'reference'.*'sparse'"):
        m.set_backend("nope")
    with pytest.raises(ValueError, match="'nope'"):
        set_backend(m, "nope")


@pytest.mark.parametrize(
    "x_shape, mask, needle",
    [
        ((2, 3, 9), None, r"\(2, 3, 9\)"),
        ((2, 3), None, r"\(2, 3\)"),
        ((2, 3, 8), torch.ones(2, 4, dtype=torch.bool), r"\(2, 4\)"),
        ((2, 3, 8), torch.ones(2, 3), "torch.float32"),
        ((2, 3, 8), torch.ones(2, 3, 3, dtype=torch.long), "torch.int64"),
        ((2, 3, 8), torch.ones(3, 3, dtype=torch.bool), r"\(3, 3\)"),
        ((2, 3, 8), torch.ones(2, 2, 3, dtype=torch.bool), r"\(2, 2, 3\)"),
        ((2, 3, 8), torch.tensor([[1, 2, 1], [1, 1, 0]]), r"only 0 and 1.*\[2\]"),
        ((2, 3, 8), [[1, 1, 1], [1, 1, 1]], "must be a tensor"),
    ],
)
def test_invalid_input_raises(x_shape, mask, needle):
    m = layer(dim=8, num_heads=2)
    with pytest.raises(ValueError, match=needle):
        m(torch.randn(*x_shape), mask)


def test_mask_forms_agree():
    """bool (B, S), 0/1 int (B, S), (B, T, S) and (B, 1, T, S) masks mean the same thing."""
    m = layer(dim=8, num_heads=2, num_shared=1, top_k=1)
    x = torch.randn(2, 5, 8)
    keep = torch.rand(2, 5) > 0.3
    keep[:, 0] = True
    ref = m(x, keep).output
    for mask in (keep.int(), keep[:, None].expand(2, 5, 5), keep[:, None, None].expand(2, 1, 5, 5)):
        torch.testing.assert_close(m(x, mask).output, ref, atol=0, rtol=0)


def test_bad_positions_raise():
    m = layer(dim=8, num_heads=2, rope=True)
    with pytest.raises(ValueError, match="positions"):
        m(torch.randn(2, 3, 8), positions=torch.zeros(2, 4, dtype=torch.long))


# ---- dropout ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS.names())
def test_dropout(backend):
    m = layer(dim=16, num_heads=4, num_shared=1, top_k=2, dropout=0.5, backend=backend, causal=True)
    x = torch.randn(2, 12, 16, requires_grad=True)
    m.eval()
    torch.testing.assert_close(m(x).output, m(x).output, atol=0, rtol=0)
    m.train()
    a, b = m(x).output, m(x).output
    assert not torch.allclose(a, b)
    a.sum().backward()
    grads = [x.grad] + [p.grad for p in m.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    assert m.q_proj.weight.grad.abs().sum() > 0


# ---- robustness: a rejected call changes nothing; shared configs; derived fields ------------


def test_rejected_call_leaves_the_cache_unchanged():
    m = layer(dim=8, num_heads=2, num_shared=1, top_k=1, causal=True, rope=True).eval()
    x = torch.randn(1, 6, 8)
    cache = KVCache(capacity=2)
    first = m(x[:, :4], cache=cache).output
    with pytest.raises(ValueError, match="attention_mask"):
        m(x[:, 4:], torch.ones(1, 3, dtype=torch.bool), cache)  # wrong S: 3 instead of 6
    with pytest.raises(ValueError, match="positions"):
        m(x[:, 4:], positions=torch.zeros(1, 5, dtype=torch.long), cache=cache)
    assert cache.length == 4
    rest = m(x[:, 4:], cache=cache).output  # the retry equals the uninterrupted run
    torch.testing.assert_close(torch.cat([first, rest], 1), m(x).output, atol=1e-6, rtol=1e-5)


def test_set_backend_of_one_layer_leaves_layers_built_from_the_same_config():
    cfg = MoHConfig(dim=8, num_heads=2)
    a, b = MoHAttention(cfg), MoHAttention(cfg)
    a.set_backend("masked")
    assert (a.cfg.backend, b.cfg.backend, cfg.backend) == ("masked", "sparse", "sparse")


def test_replace_derives_dependent_fields_again():
    from dataclasses import replace

    from moh.config import to_dict

    cfg = MoHConfig(dim=64, num_heads=4, num_shared=1)
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.top_k) == (16, 4, 3)
    wider = replace(cfg, dim=128, num_heads=8)
    assert (wider.head_dim, wider.num_kv_heads, wider.top_k) == (16, 8, 7)
    fixed = replace(MoHConfig(dim=64, num_heads=4, head_dim=8), dim=128)
    assert fixed.head_dim == 8  # given explicitly: kept
    assert to_dict(cfg)["head_dim"] is None and to_dict(fixed)["head_dim"] == 8


@pytest.mark.parametrize("backend", BACKENDS.names())
@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batch_or_sequence(backend, shape):
    m = layer(dim=8, num_heads=2, num_shared=1, top_k=1, causal=True, out_bias=True, backend=backend)
    out = m(torch.randn(*shape, 8)).output
    assert out.shape == (*shape, 8)


# ---- mixed precision, compile, export -----------------------------------------------------


def _relative_error(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("backend", BACKENDS.names())
@pytest.mark.parametrize("causal", [False, True])
def test_bf16_autocast_trains_and_matches_the_reference(backend, causal):
    """Forward and backward under CPU bf16 autocast (what accelerate's mixed_precision=bf16 does)
    against the reference under the same autocast, at bf16's precision (against fp32 the error is
    larger: a router decision flips on near ties for ~0.5% of the tokens)."""
    m = layer(seed=3, dim=64, num_heads=8, num_shared=2, top_k=2, causal=causal, rope=True, backend="reference")
    x = torch.randn(2, 96, 64)
    with torch.autocast("cpu", torch.bfloat16):
        want = m(x)
    m.set_backend(backend)
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16):
        out = m(xg)
    out.output.float().pow(2).sum().backward()
    assert out.output.dtype == torch.bfloat16 and xg.grad.dtype == torch.float32
    assert torch.isfinite(xg.grad).all() and m.q_proj.weight.grad.abs().sum() > 0
    assert torch.equal(out.routing.active_BTH, want.routing.active_BTH)
    assert _relative_error(out.output, want.output) < 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS.names())
def test_half_precision_weights(backend, dtype):
    m = layer(seed=4, dim=64, num_heads=8, num_shared=2, top_k=2, causal=True, rope=True, backend="reference").to(dtype)
    x = torch.randn(2, 80, 64, dtype=dtype)
    want = m(x).output
    m.set_backend(backend)
    out = m(x.clone().requires_grad_()).output
    out.float().sum().backward()
    assert out.dtype == dtype and m.q_proj.weight.grad.dtype == dtype
    assert _relative_error(out, want) < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["masked", "reference"])
def test_compiles_with_fullgraph_and_exports(backend):
    m = layer(dim=32, num_heads=4, num_shared=1, top_k=2, causal=True, rope=True, backend=backend).eval()
    x = torch.randn(2, 16, 32)
    want = m(x)
    got = torch.compile(m, fullgraph=True)(x)  # no graph break: the whole layer is one graph
    torch.testing.assert_close(got.output, want.output, atol=1e-5, rtol=1e-5)
    exported = torch.export.export(m, (x,)).module()(x)  # MoHOutput / Routing are pytree nodes
    torch.testing.assert_close(exported.output, want.output, atol=1e-5, rtol=1e-5)
    assert exported.routing.num_shared == 1 and torch.equal(exported.routing.active_BTH, want.routing.active_BTH)
