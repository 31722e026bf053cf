"""Routers: decide, per token, which heads are used and with which weight (paper Sec. 3.2).

Every router is an ``nn.Module`` built as ``Router(cfg)`` and called as
``router(x_BTD, raw_queries) -> Routing`` where ``raw_queries()`` lazily returns the query
projection of every head *before* qk-norm and RoPE, shape (B, T, H, hd) (only ``query_norm``
asks for it; call it with autograd on: once computed, backends take their queries from it
instead of projecting again). Register new ones with ``@ROUTERS.register("name")``.

Shape legend: B batch, T tokens, D model width, H heads, E routed heads, K top-k.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moh.core.routing import RawQueries, Routing, scatter_topk as _scatter_topk
from moh.kernels import cpu as cpu_kernels
from moh.layers.projection import sliceable
from moh.registry import ROUTERS

@ROUTERS.register("all")
class AllHeadsRouter(nn.Module):
    """Every head, gate 1: exactly multi-head attention (the baseline)."""

    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_heads

    def forward(self, x_BTD: Tensor, raw_queries: RawQueries) -> Routing:
        B, T, _ = x_BTD.shape
        gates = x_BTD.new_ones(B, T, self.num_heads)
        active = torch.ones(B, T, self.num_heads, dtype=torch.bool, device=x_BTD.device)
        return Routing(gates, active, None, num_shared=self.num_heads, learned=False)


@ROUTERS.register("two_stage")
class TwoStageRouter(nn.Module):
    """The paper's learned two-stage router (Eqs. 4-6).

    routed:  p = softmax(W_r x) over the E routed heads; keep the top-k, renormalise the kept ones
             to sum 1 and multiply by k.
    shared:  softmax(W_s x) * num_shared (a constant 1 when num_shared == 1).
    balance: [a1, a2] = softmax(W_h x) * 2; shared gates * a1, routed gates * a2 (only when there
             are both shared and routed heads).
    With uniform router outputs every gate is exactly 1 and the layer equals multi-head attention.
    """

    def __init__(self, cfg):
        super().__init__()
        self.num_heads, self.num_shared, self.top_k = cfg.num_heads, cfg.num_shared, cfg.top_k
        E = cfg.num_heads - cfg.num_shared
        self.w_routed = nn.Linear(cfg.dim, E, bias=False) if E > 0 else None
        self.w_shared = nn.Linear(cfg.dim, cfg.num_shared, bias=False) if cfg.num_shared > 1 else None
        self.w_balance = nn.Linear(cfg.dim, 2, bias=False) if (cfg.num_shared > 0 and E > 0) else None
        for lin in (self.w_routed, self.w_shared, self.w_balance):
            if lin is not None:
                nn.init.normal_(lin.weight, std=cfg.dim**-0.5)

    def logits(self, x_BTD: Tensor) -> list[Optional[Tensor]]:
        """[routed, shared, balance] logits (None where the projection does not exist). Plain
        linear projections of 32 tokens or more run as one product (their weights concatenated:
        D=768, 1 thread, fused / separate: 2048 tokens 0.57 / 1.58 ms, where each narrow product
        costs as much as all three; 128 tokens 62 / 95 µs; 32: 31 / 35 µs; one token 19 / 9 µs)."""
        lins = [self.w_routed, self.w_shared, self.w_balance]
        present = [lin for lin in lins if lin is not None]
        tokens = x_BTD.numel() // max(x_BTD.shape[-1], 1)
        if tokens >= 32 and len(present) > 1 and all(sliceable(lin) and lin.bias is None for lin in present):
            parts = iter(_linears(x_BTD, [lin.weight for lin in present]))
            return [None if lin is None else next(parts) for lin in lins]
        return [None if lin is None else lin(x_BTD) for lin in lins]

    def forward(self, x_BTD: Tensor, raw_queries: RawQueries) -> Routing:
        S, K = self.num_shared, self.top_k
        modules = self._modules  # not through nn.Module.__getattr__ (a decode step counts every lookup)
        lins = (modules.get("w_routed"), modules.get("w_shared"), modules.get("w_balance"))
        weights = _fast_router(x_BTD, lins)
        if weights is not None:
            logits = None
            if x_BTD.numel() > 16 * x_BTD.shape[-1]:
                logits = F.linear(x_BTD, torch.cat([w for w in weights if w is not None])).flatten(0, -2)
            gates, active, probs = cpu_kernels.two_stage_router(x_BTD, *weights[:2], S, weights[2], K, check=False,
                                                                logits=logits)
            return Routing(gates, active, probs, num_shared=S, learned=True)
        B, T, _ = x_BTD.shape
        routed_logits, shared_logits, balance_logits = self.logits(x_BTD)
        if shared_logits is not None:
            shared = F.softmax(shared_logits, dim=-1, dtype=torch.float32).to(x_BTD.dtype) * S
        else:
            shared = x_BTD.new_ones(B, T, S)
        if routed_logits is None:
            active = torch.ones(B, T, S, dtype=torch.bool, device=x_BTD.device)
            return Routing(shared, active, None, num_shared=S, learned=False)
        probs = F.softmax(routed_logits, dim=-1, dtype=torch.float32).to(x_BTD.dtype)  # (B,T,E)
        top_p, top_i = top_k(probs, K)  # (B,T,K)
        routed = top_p / top_p.sum(-1, keepdim=True).clamp_min(torch.finfo(top_p.dtype).tiny) * K
        if balance_logits is not None:
            a = F.softmax(balance_logits, dim=-1, dtype=torch.float32).to(x_BTD.dtype) * 2
            shared = shared * a[..., :1]
            routed = routed * a[..., 1:]
        gates, active = _scatter_topk(routed, top_i, S, shared, self.num_heads)
        return Routing(gates, active, probs, num_shared=S, learned=True)


def _fast_router(x_BTD: Tensor, lins: tuple) -> Optional[list[Optional[Tensor]]]:
    """The weights of ``lins`` (None for a missing projection) where moh's C++ router
    (``moh.kernels.cpu.two_stage_router``) can run, else None: fp32 CPU tokens without autograd,
    plain bias-free linear projections with contiguous fp32 weights, routed heads. Up to 16
    tokens it does all of it (decode steps: one token 28 µs per call against 108 µs of torch
    operations, hot caches), for more the softmaxes and top-k after one product for the logits
    (2048 tokens, D=768, 10 routed heads, 1 thread: 1.0 ms against 1.8 ms of torch operations)."""
    if lins[0] is None or x_BTD.dtype != torch.float32 or x_BTD.device.type != "cpu":
        return None
    weights = []
    for lin in lins:
        if lin is None:
            weights.append(None)
            continue
        params = lin._parameters  # not through nn.Module.__getattr__: this runs every layer call
        if not sliceable(lin) or params.get("bias") is not None:
            return None
        w = params["weight"]
        if w.dtype != torch.float32 or not w.is_contiguous():
            return None
        weights.append(w)
    if torch.is_grad_enabled() and (x_BTD.requires_grad or any(w is not None and w.requires_grad for w in weights)):
        return None
    return weights if cpu_kernels.available() else None


def top_k(probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest along the last dimension, ties to the lower index (a stable sort: the same
    heads on every device and in moh's C++ router; ``Tensor.topk`` breaks ties as its algorithm
    happens to, e.g. [8, 6, 7, 5] for 4 of 10 equal values on CPU)."""
    values, index = probs.sort(dim=-1, descending=True, stable=True)
    return values[..., :k], index[..., :k]


def _linears(x: Tensor, weights: list[Tensor]) -> tuple[Tensor, ...]:
    """``_Linears``; under autocast both operands are cast first, as autocast does for a linear."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return _Linears.apply(x.to(dtype), *[w.to(dtype) for w in weights])
    return _Linears.apply(x, *weights)


class _Linears(torch.autograd.Function):
    """x @ W_i^T for several weights as one product. The backward takes only the outputs that
    received a gradient (a weight whose output is not in the loss gets None, as with separate
    linears, not a zero gradient an optimizer would act on)."""

    @staticmethod
    def forward(ctx, x, *weights):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, *weights)
        return F.linear(x, torch.cat(weights)).split([w.shape[0] for w in weights], dim=-1)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        x, *weights = ctx.saved_tensors
        used = [i for i, g in enumerate(grads) if g is not None]
        if not used:
            return (None,) * (1 + len(weights))
        g = torch.cat([grads[i] for i in used], dim=-1)  # (.., sum of the used widths)
        dx = g @ torch.cat([weights[i] for i in used]) if ctx.needs_input_grad[0] else None
        dw: list[Optional[Tensor]] = [None] * len(weights)
        if any(ctx.needs_input_grad[1:]):
            full = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            for i, piece in zip(used, full.split([weights[i].shape[0] for i in used])):
                dw[i] = piece if ctx.needs_input_grad[1 + i] else None
        return (dx, *dw)


@ROUTERS.register("query_norm")
class QueryNormRouter(nn.Module):
    """Parameter-free router used to continue-tune a pretrained LLaMA3 into MoH (paper Sec. 4.4).

    logits = L2 norm of each routed head's query (before RoPE), divided by their standard deviation
    across the routed heads; softmax; top-k. Gates are hard: 1 for the kept and the shared heads.
    """

    def __init__(self, cfg):
        super().__init__()
        self.num_heads, self.num_shared, self.top_k = cfg.num_heads, cfg.num_shared, cfg.top_k

    def forward(self, x_BTD: Tensor, raw_queries: RawQueries) -> Routing:
        B, T, _ = x_BTD.shape
        S, K = self.num_shared, self.top_k
        shared = x_BTD.new_ones(B, T, S)
        if self.num_heads == S:
            active = torch.ones(B, T, S, dtype=torch.bool, device=x_BTD.device)
            return Routing(shared, active, None, num_shared=S, learned=False)
        queries = raw_queries()  # outside no_grad: the backend reuses this projection for its queries
        with torch.no_grad():
            norms = queries[:, :, S:].float().norm(dim=-1)  # (B,T,E)
            std = norms.std(dim=-1, keepdim=True) if norms.shape[-1] > 1 else torch.ones_like(norms)
            probs = F.softmax(norms / std.clamp_min(1e-6), dim=-1).to(x_BTD.dtype)
            top_i = probs.topk(K, dim=-1).indices
        gates, active = _scatter_topk(x_BTD.new_ones(B, T, K), top_i, S, shared, self.num_heads)
        return Routing(gates, active, probs, num_shared=S, learned=False)


def build_router(cfg) -> nn.Module:
    return ROUTERS.get(cfg.router)(cfg)


from moh.core import calibrated as _calibrated  # noqa: E402,F401  (registers "calibrated"; it imports from here)
