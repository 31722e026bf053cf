"""Phase-1 research harness: per-token head gating inside the original HF LlamaForCausalLM.

Every attention layer's o_proj input (B, T, H*hd) is multiplied by gates (B, T, H) chosen by a
policy from what a router could see (the layer input x after its norm, the raw queries) and, for
oracles, from what it could not (each head's contribution c_h = o_h W_O^h to the output).

Shape legend: B batch, T tokens, H heads, hd head width, D width, N tokens flattened.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

MODEL = Path(__file__).resolve().parents[2] / ".cache/smollm2-135m"
TOKENS = Path(__file__).resolve().parents[2] / ".cache/data/smollm2-tokens"


def load_model(path=MODEL):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def tokens(split: str) -> np.ndarray:
    f = {"train": "train.bin", "validation": "val.bin", "heldout": "heldout.bin"}[split]
    return np.fromfile(TOKENS / f, dtype=np.uint16).astype(np.int64)


def windows(ids: np.ndarray, seq: int, n: int | None = None, seed: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (n, seq); with a seed, n windows drawn at random starts."""
    if seed is None:
        k = len(ids) // seq
        w = ids[: k * seq].reshape(k, seq)
        if n is not None:
            w = w[:n]
        return torch.from_numpy(w)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seq, size=n)
    return torch.from_numpy(np.stack([ids[s: s + seq] for s in starts]))


class Gating:
    """Hooks on every layer: capture x (attn input) and raw q; gate o_proj's input by policy."""

    def __init__(self, model, policy=None, record=None):
        self.model, self.policy, self.record = model, policy, record
        self.layers = model.model.layers
        cfg = model.config
        self.H, self.G, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.x, self.q = {}, {}
        self.handles = []
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            self.handles.append(a.register_forward_pre_hook(self._pre_attn(i), with_kwargs=True))
            self.handles.append(a.q_proj.register_forward_hook(self._q_hook(i)))
            self.handles.append(a.o_proj.register_forward_pre_hook(self._o_hook(i)))

    def _pre_attn(self, i):
        def hook(mod, args, kwargs):
            self.x[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return hook

    def _q_hook(self, i):
        def hook(mod, args, out):
            self.q[i] = out
        return hook

    def contributions(self, i, o):
        """c (B, T, H, D): head h's part of the attention output."""
        B, T, _ = o.shape
        W = self.layers[i].self_attn.o_proj.weight  # (D, H*hd)
        D = W.shape[0]
        return torch.einsum("bthe,dhe->bthd", o.view(B, T, self.H, self.hd), W.view(D, self.H, self.hd))

    def _o_hook(self, i):
        def hook(mod, args):
            o = args[0]
            B, T, _ = o.shape
            if self.record is not None:
                self.record(i, self.x[i], self.q[i], o, self)
            if self.policy is None:
                return None
            g = self.policy(i, self.x[i], self.q[i], o, self)  # (B, T, H) or (gates, extra (B,T,D))
            extra = None
            if isinstance(g, tuple):
                g, extra = g
            o = (o.view(B, T, self.H, self.hd) * g.unsqueeze(-1).to(o.dtype)).view(B, T, -1)
            if extra is not None:
                self._extra[i] = extra
            return (o,)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def perplexity(model, win: torch.Tensor, batch: int = 4, policy=None, record=None, active=None) -> dict:
    g = Gating(model, policy, record)
    g._extra = {}
    extra_handles = []
    for i, layer in enumerate(model.model.layers):  # add an optional per-token compensation after o_proj
        def fh(mod, args, out, i=i):
            e = g._extra.pop(i, None)
            return out if e is None else out + e.to(out.dtype)
        extra_handles.append(layer.self_attn.o_proj.register_forward_hook(fh))
    nll, n = 0.0, 0
    t = time.time()
    try:
        for s in range(0, len(win), batch):
            ids = win[s: s + batch]
            logits = model(input_ids=ids).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                   reduction="sum")
            nll += loss.item()
            n += ids[:, 1:].numel()
    finally:
        g.remove()
        for h in extra_handles:
            h.remove()
    return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n, "s": time.time() - t}


# ---------------------------------------------------------------------------------------------
# policies: (layer, x, q, o, gating) -> gates (B, T, H)


def topk_gates(score_BTH, k, shared=None):
    """1 for the top-k of score among non-shared heads and for shared heads (index list per layer)."""
    s = score_BTH.clone()
    if shared is not None and len(shared):
        s[..., shared] = float("inf")
        k = k + len(shared)
    idx = s.topk(k, dim=-1).indices
    return torch.zeros_like(score_BTH).scatter(-1, idx, 1.0)


def qnorm_policy(S=3, K=4):
    """The paper's query_norm on the first S heads shared, top-K of the rest by ||q|| / std."""
    def pol(i, x, q, o, g):
        B, T, _ = q.shape
        n = q.view(B, T, g.H, g.hd)[:, :, S:].norm(dim=-1)
        n = n / n.std(-1, keepdim=True).clamp_min(1e-6)
        gates = torch.ones(B, T, g.H)
        gates[..., S:] = topk_gates(n, K)
        return gates
    return pol


def random_policy(S=3, K=4, seed=0, shared=None):
    gen = torch.Generator().manual_seed(seed)

    def pol(i, x, q, o, g):
        B, T, _ = q.shape
        r = torch.rand(B, T, g.H, generator=gen)
        sh = list(range(S)) if shared is None else shared[i]
        return topk_gates(r, K, sh)
    return pol


def fixed_policy(drop):
    """drop: per layer list of head indices (or one list for all layers)."""
    def pol(i, x, q, o, g):
        B, T, _ = q.shape
        gates = torch.ones(B, T, g.H)
        d = drop[i] if isinstance(drop[0], (list, tuple)) else drop
        gates[..., list(d)] = 0
        return gates
    return pol


def oracle_norm_policy(K_total=7, shared=None, K=None):
    """Keep the heads with the largest ||c_h|| per token (shared: forced per layer)."""
    def pol(i, x, q, o, g):
        c = g.contributions(i, o).norm(dim=-1)  # (B,T,H)
        if shared is None:
            return topk_gates(c, K_total)
        return topk_gates(c, K, shared[i])
    return pol
