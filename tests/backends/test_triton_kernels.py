"""The Triton kernels of the sparse backend against slow, obviously-correct torch references.

Without CUDA the kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` must be set
before the kernels are decorated (at import of ``moh.backends.sparse.triton_kernels``), so it is
set here at the top, before anything imports triton. With CUDA (the GPU check script) the same
tests run compiled. Shapes are tiny but always span several row blocks and key blocks, with S and
M not multiples of the block (blocks of 16 on CPU).
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (3.6 reads it early)

triton = pytest.importorskip(
    "triton", reason="triton is not installed: the Triton kernels (CUDA, or CPU via TRITON_INTERPRET) cannot run"
)

_MOD = "moh.backends.sparse.triton_kernels"
if _MOD in sys.modules and DEVICE == "cpu" and not sys.modules[_MOD]._interpreting():
    importlib.reload(sys.modules[_MOD])  # imported before the interpreter was switched on: decorate again
tk = importlib.import_module(_MOD)

# several blocks at tiny shapes: 16 everywhere (tl.dot's minimum); the decode split count is forced
SMALL = tk.TritonTuning(block_m=16, block_n=16, bwd_block_m=16, bwd_block_n=16, dq_block_m=16, dq_block_n=16,
                        decode_block_n=16,
                        decode_min_keys=16, decode_programs=64, mm_block_m=16, mm_block_n=16, mm_block_k=16)
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}  # relative L2 error vs float64


def ref_rows(q, k, v, qpos, kv_head, scale, causal, key_mask):
    """Per row: masked softmax over the keys it may see, float64; a row with none gives 0."""
    B, P, M, _ = q.shape
    S = k.shape[2]
    out = []
    for b in range(B):
        for p in range(P):
            g = int(kv_head[p])
            for m in range(M):
                allowed = torch.ones(S, dtype=torch.bool, device=q.device)
                if causal:
                    allowed &= torch.arange(S, device=q.device) <= qpos[b, p, m]
                if key_mask is not None:
                    allowed &= key_mask[b]
                if not allowed.any():
                    out.append(q.new_zeros(q.shape[-1], dtype=torch.float64))
                    continue
                scores = (k[b, g, allowed].double() @ q[b, p, m].double()) * scale
                out.append(torch.softmax(scores, 0) @ v[b, g, allowed].double())
    return torch.stack(out).view(*q.shape)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def _rows_case(B, P, G, M, S, hd, dtype, causal, kv_head, gen, sorted_rows=True, dead_rows=True):
    """Inputs as the sparse backend makes them: q a transposed view, k/v views of a bigger cache."""
    q = torch.randn(B, M, P, hd, generator=gen).to(dtype).to(DEVICE).transpose(1, 2)  # non-contiguous
    cache = torch.randn(2, B, G, S + 5, hd, generator=gen).to(dtype).to(DEVICE)
    k, v = cache[0, :, :, 2 : S + 2], cache[1, :, :, 2 : S + 2]
    qpos = torch.randint(-2 if dead_rows else 0, S + 2, (B, P, M), generator=gen)
    qpos = qpos.sort(-1).values if sorted_rows else qpos
    return q, k, v, qpos.to(DEVICE), torch.tensor(kv_head, device=DEVICE)


CASES = [
    # (name, B, P, G, M, S, hd, dtype, causal, kv_head, key padding, sorted rows)
    ("causal-gqa-pad-fp32", 2, 4, 2, 37, 45, 16, torch.float32, True, [1, 0, 1, 0], True, True),
    ("bidir-gqa-pad-hd24-fp32", 2, 3, 1, 20, 35, 24, torch.float32, False, [0, 0, 0], True, True),
    ("causal-unsorted-bf16", 1, 2, 2, 33, 40, 32, torch.bfloat16, True, [0, 1], False, False),
    ("bidir-mha-hd8-fp16", 1, 2, 2, 18, 21, 8, torch.float16, False, [0, 1], False, True),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rows_attention_matches_reference(case):
    _, B, P, G, M, S, hd, dtype, causal, kv_head, pad, sorted_rows = case
    gen = torch.Generator().manual_seed(len(case[0]))
    q, k, v, qpos, kvh = _rows_case(B, P, G, M, S, hd, dtype, causal, kv_head, gen, sorted_rows)
    key_mask = None
    if pad:
        key_mask = torch.rand(B, S, generator=gen) > 0.3
        key_mask[0, :9] = False  # item 0: rows before key 9 have no key (causal)
        if not causal:
            key_mask[-1] = False  # last item: no key at all
        key_mask = key_mask.to(DEVICE)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    scale = hd**-0.5
    out = tk.rows_attention(q, k, v, qpos, kvh, scale=scale, causal=causal, key_mask=key_mask, tuning=SMALL)
    ref = ref_rows(q, k, v, qpos, kvh, scale, causal, key_mask)
    assert out.dtype == dtype and out.shape == (B, P, M, hd)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)
    dead = ref.abs().sum(-1) == 0  # rows with no allowed key: exactly 0
    assert dead.any() == (causal or pad)
    assert (out[dead] == 0).all()

    dout = torch.randn(out.shape, generator=gen).to(dtype).to(DEVICE)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    refs = torch.autograd.grad(ref, (q, k, v), dout.double())
    for name, g, r in zip("qkv", grads, refs):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        assert rel_err(g, r) < 2 * TOL[dtype], (name, rel_err(g, r))
    assert (grads[0][dead] == 0).all()


def test_rows_attention_with_the_cuda_block_sizes():
    """The default CUDA settings (128 x 64 forward blocks, 64 x 32 dk/dv and dq blocks): GQA, key
    padding, bf16, rows spanning two forward blocks with a ragged last one."""
    gen = torch.Generator().manual_seed(7)
    B, P, G, M, S, hd = 1, 2, 1, 150, 200, 64
    q, k, v, qpos, kvh = _rows_case(B, P, G, M, S, hd, torch.bfloat16, True, [0, 0], gen)
    key_mask = (torch.rand(B, S, generator=gen) > 0.2).to(DEVICE)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    tuning = tk.cuda_tuning(hd, torch.bfloat16, sms=2)
    out = tk.rows_attention(q, k, v, qpos, kvh, scale=0.125, causal=True, key_mask=key_mask, tuning=tuning)
    ref = ref_rows(q, k, v, qpos, kvh, 0.125, True, key_mask)
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    dout = torch.randn(out.shape, generator=gen).to(torch.bfloat16).to(DEVICE)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout.double())):
        assert rel_err(g, r) < 2 * TOL[torch.bfloat16]


def test_rows_attention_causal_skips_unseen_key_blocks():
    """Keys from the block after a row block's largest qpos on are never read: NaN there changes
    nothing (forward and backward); their gradient is 0."""
    gen = torch.Generator().manual_seed(1)
    B, P, G, M, S, hd = 1, 2, 1, 20, 64, 16
    q, k, v, _, _ = _rows_case(B, P, G, M, S, hd, torch.float32, True, [0, 0], gen)
    kvh = torch.tensor([0, 0])  # on the host: allowed, moved by the function
    qpos = torch.randint(0, 30, (B, P, M), generator=gen).sort(-1).values.to(DEVICE)
    qpos[..., -1] = 31  # every row block sees keys < 32 only: blocks 2 and 3 of 16 are skipped
    k, v = k.detach().clone(), v.detach().clone()
    k[:, :, 32:], v[:, :, 32:] = float("nan"), float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = tk.rows_attention(q, k, v, qpos, kvh, scale=0.25, causal=True, tuning=SMALL)
    ref = ref_rows(q, k, v, qpos, kvh, 0.25, True, None)
    assert rel_err(out, ref) < TOL[torch.float32]
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=gen).to(DEVICE))
    assert torch.isfinite(dq).all() and (dk[:, :, 32:] == 0).all() and (dv[:, :, 32:] == 0).all()
    assert torch.isfinite(dk[:, :, :32]).all() and torch.isfinite(dv[:, :, :32]).all()


def ref_decode(q, k, v, active, scale, lengths, key_mask):
    """Per (item, head): masked softmax over the allowed keys, float64; inactive heads 0."""
    B, H, hd = q.shape
    G, S = k.shape[1], k.shape[2]
    out = torch.zeros(B, H, hd, dtype=torch.float64, device=q.device)
    for b in range(B):
        for h in range(H):
            allowed = torch.ones(S, dtype=torch.bool, device=q.device)
            if lengths is not None:
                allowed &= torch.arange(S, device=q.device) < lengths[b]
            if key_mask is not None:
                allowed &= key_mask[b]
            if active[b, h] and allowed.any():
                g = h // (H // G)
                p = torch.softmax((k[b, g, allowed].double() @ q[b, h].double()) * scale, 0)
                out[b, h] = p @ v[b, g, allowed].double()
    return out


@pytest.mark.parametrize(
    "B, H, G, S, hd, dtype, use_len, use_mask",
    [
        (3, 4, 4, 70, 16, torch.float32, True, False),  # one head per KV head (broadcast path), lengths
        (2, 4, 2, 50, 32, torch.bfloat16, False, True),  # 2 heads per KV head (tl.dot path), padding
        (2, 6, 2, 41, 12, torch.float16, True, True),  # 3 heads per KV head, hd padded
    ],
)
def test_decode_attention_matches_reference(B, H, G, S, hd, dtype, use_len, use_mask):
    gen = torch.Generator().manual_seed(B * 100 + H)
    buf = torch.randn(2, B, S + 7, G, hd, generator=gen).to(dtype).to(DEVICE)  # a preallocated (B, S, G, hd) cache
    k, v = buf[0, :, :S].transpose(1, 2), buf[1, :, :S].transpose(1, 2)  # (B, G, S, hd) non-contiguous views
    q = torch.randn(B, H, hd, generator=gen).to(dtype).to(DEVICE)
    active = torch.rand(B, H, generator=gen) > 0.4
    active[0] = False
    active[0, 1] = True
    active[-1, : H // G] = False  # KV head 0 of the last item: no active head, its cache is never read
    active = active.to(DEVICE)
    buf[:, -1, :, 0] = float("nan")
    lengths = key_mask = None
    if use_len:
        lengths = torch.randint(1, S + 1, (B,), generator=gen)
        lengths[-1] = 0  # no key: 0
        lengths = lengths.to(DEVICE)
    if use_mask:
        key_mask = (torch.rand(B, S, generator=gen) > 0.3).to(DEVICE)
    out = tk.decode_attention(q, k, v, active, scale=hd**-0.5, lengths=lengths, key_mask=key_mask, tuning=SMALL)
    ref = ref_decode(q, k.nan_to_num(), v.nan_to_num(), active, hd**-0.5, lengths, key_mask)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out[~active] == 0).all()
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)


def test_gather_matmul_matches_gather_then_bmm():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(30, 40, generator=gen).to(DEVICE).requires_grad_()
    rows = torch.randint(0, 30, (2, 3, 21), generator=gen).to(DEVICE)
    w = torch.randn(3, 24, 40, generator=gen).to(DEVICE).requires_grad_()
    w_PDo = w.transpose(1, 2)  # (P, D, o) as the query projection passes it: a strided view
    y = tk.gather_matmul(x, rows, w_PDo, tuning=SMALL)
    ref = x.double()[rows] @ w_PDo.double()[None]
    assert rel_err(y, ref) < TOL[torch.float32]
    dy = torch.randn(y.shape, generator=gen).to(DEVICE)
    for g, r in zip(torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(ref, (x, w), dy.double())):
        assert rel_err(g, r) < TOL[torch.float32]
    yb = tk.gather_matmul(x.detach().bfloat16(), rows, w_PDo.detach().bfloat16(), tuning=SMALL)
    assert yb.dtype == torch.bfloat16 and rel_err(yb, ref) < TOL[torch.bfloat16]


def test_clear_errors():
    q = torch.zeros(1, 1, 4, 300, device=DEVICE)
    with pytest.raises(ValueError, match="hd=300"):
        tk.rows_attention(q, q, q, None, torch.zeros(1, dtype=torch.long), scale=1.0, causal=False)
    with pytest.raises(ValueError, match="qpos"):
        q = torch.zeros(1, 1, 4, 16, device=DEVICE)
        tk.rows_attention(q, q, q, None, torch.zeros(1, dtype=torch.long, device=DEVICE), scale=1.0, causal=True)
    with pytest.raises(ValueError, match="kv_head"):
        tk.rows_attention(q, q, q, None, torch.ones(1, dtype=torch.long), scale=1.0, causal=False)
    with pytest.raises(ValueError, match="power of two"):
        tk.TritonTuning(block_m=24)
    with pytest.raises(ValueError, match="bool"):
        tk.decode_attention(q[:, 0], q, q, torch.ones(1, 1), scale=1.0)


def test_no_keys_or_no_rows_give_zeros():
    q = torch.randn(1, 2, 5, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 1, 0, 16, device=DEVICE, requires_grad=True)
    qpos = torch.zeros(1, 2, 5, dtype=torch.long, device=DEVICE)
    out = tk.rows_attention(q, k, k, qpos, torch.zeros(2, dtype=torch.long), scale=1.0, causal=True)
    assert (out == 0).all()
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert (dq == 0).all()
    assert tk.rows_attention(q[:, :, :0], k, k, None, torch.zeros(2, dtype=torch.long), scale=1.0,
                             causal=False).shape == (1, 2, 0, 16)
