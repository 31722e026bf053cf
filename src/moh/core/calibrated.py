"""The ``calibrated`` router: predicts, from the layer input, how much each routed head will
contribute to the attention output, and keeps the top-k (made for converting pretrained models).

For a pretrained multi-head model the heads that matter for a token can be measured: the size of
head h's contribution ``c_h = head_h(x) W_O^h`` to the layer output (paper Eq. 3 with every gate 1).
Keeping the 7 of 9 heads with the largest ``||c_h||`` per token (an oracle) changes SmolLM2-135M's
held-out perplexity by +1.6%, this router by +4.0%, the paper's query-norm rule by +780%
(``docs/results/convert.md``). This router is a linear predictor of ``log ||c_h||`` from the layer
input, ``score = W x + b`` for the routed heads, fitted by least squares on a small amount of text
with the model frozen (``moh.convert.calibrate``). Gates are hard: 1 for the shared heads and the
top-k routed heads by score, 0 elsewhere, so the layer computes exactly the pretrained heads'
sum over the heads it keeps (and multi-head attention itself when every head is kept).

The scores carry no gradient to the gates (hard gates, ``learned=False``: no load-balance loss);
the router is re-fitted, not trained. ``probs_BTE`` = softmax of the scores, for analysis.

Shape legend: B batch, T tokens, D width, H heads, E routed heads, K top-k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moh.core.routing import RawQueries, Routing, scatter_topk as _scatter_topk
from moh.registry import ROUTERS


@ROUTERS.register("calibrated")
class CalibratedRouter(nn.Module):
    """score (B, T, E) = ``score(x)``, a linear layer with bias (zeros until calibrated); the
    top-k routed heads by score are kept."""

    def __init__(self, cfg):
        super().__init__()
        self.num_heads, self.num_shared, self.top_k = cfg.num_heads, cfg.num_shared, cfg.top_k
        E = cfg.num_heads - cfg.num_shared
        self.score = nn.Linear(cfg.dim, E, bias=True) if E > 0 else None
        if self.score is not None:
            nn.init.zeros_(self.score.weight)
            nn.init.zeros_(self.score.bias)

    def forward(self, x_BTD: Tensor, raw_queries: RawQueries) -> Routing:
        B, T, _ = x_BTD.shape
        S, K = self.num_shared, self.top_k
        shared = x_BTD.new_ones(B, T, S)
        if self.score is None:
            active = torch.ones(B, T, S, dtype=torch.bool, device=x_BTD.device)
            return Routing(shared, active, None, num_shared=S, learned=False)
        with torch.no_grad():  # fitted, not trained: no gradient reaches the scores
            scores = self.score(x_BTD)  # (B, T, E): predicted log ||c_h||
            top_i = scores.topk(K, dim=-1).indices
            probs = F.softmax(scores.float(), dim=-1).to(x_BTD.dtype)
        gates, active = _scatter_topk(x_BTD.new_ones(B, T, K), top_i, S, shared, self.num_heads)
        return Routing(gates, active, probs, num_shared=S, learned=False)


__all__ = ["CalibratedRouter"]
