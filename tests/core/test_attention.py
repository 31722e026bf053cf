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
