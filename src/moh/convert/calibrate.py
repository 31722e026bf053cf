"""Calibration: measure which heads matter for each token, with the pretrained weights frozen,
and fit the ``calibrated`` router to predict it (``moh.core.calibrated``).

One pass of the unchanged model (every head, router ``all``) over calibration text records, per
layer and token, the size of each head's contribution to the attention output,
``n_h = ||head_h(x) W_O^h||`` (paper Eq. 3 with every gate 1; from the head outputs and the Gram
matrices ``W_O^h^T W_O^h``), and the layer input ``x`` (after the block's norm). It accumulates the
least-squares statistics of ``log n_h`` on ``[x, 1]`` (``X^T X``, ``X^T y``, ``y^T y``: memory
(D+1)^2 per layer, not per token) and the mean ``n_h`` per head (the shared-head rule,
``moh.convert.heads.shared_order``). ``fit`` solves the ridge regression per layer.

Calibration text comes from the *train* split only (``calibration_ids``): a moh token directory
(``moh data tokenize``) or anything ``moh.data.text.open_corpus`` reads, tokenised with the
source's tokenizer, so evaluation text (validation / held-out documents) is never seen.

Shape legend: B batch, T tokens, H heads, hd head width, D width, L layers, N tokens counted.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


@dataclass
class CalibrationStats:
    tokens: int
    mean_norm: Tensor  # (L, H) mean ||c_h|| per head
    xtx: Tensor  # (L, D+1, D+1) float64, features [x, 1]
    xty: Tensor  # (L, D+1, H) float64, targets log ||c_h||
    yty: Tensor  # (L, H) float64
    seconds: float = 0.0
    text: dict = field(default_factory=dict)  # where the text came from


@dataclass
class RouterFit:
    weight: Tensor  # (L, H, D) predicted log ||c_h|| = weight x + bias, original head order
    bias: Tensor  # (L, H)
    r2: Tensor  # (L, H) fraction of the variance of log ||c_h|| explained (on the calibration text)


def _layers(model: nn.Module) -> list[nn.Module]:
    return [blk.attn for blk in model.model.layers]


@torch.no_grad()
def collect(model: nn.Module, ids_NT: Tensor, batch_size: int = 4) -> CalibrationStats:
    """Statistics of a moh model with router ``all`` over token windows ``ids_NT``. The model is
    run with the ``masked`` backend (one dense output projection per layer, whose input holds every
    head's output) and put back as it was."""
    from moh.core.attention import set_backend

    attns = _layers(model)
    if any(a.cfg.router != "all" for a in attns):
        raise ValueError("calibration measures the unchanged model: every layer's router must be 'all'")
    L, H, hd = len(attns), attns[0].cfg.num_heads, attns[0].cfg.head_dim
    D = attns[0].cfg.dim
    xtx = torch.zeros(L, D + 1, D + 1, dtype=torch.float64)
    xty = torch.zeros(L, D + 1, H, dtype=torch.float64)
    yty = torch.zeros(L, H, dtype=torch.float64)
    total = torch.zeros(L, H, dtype=torch.float64)
    inputs: dict[int, Tensor] = {}
    grams = [a.o_proj.weight.detach().view(D, H, hd).permute(1, 2, 0).double() for a in attns]  # (H, hd, D)
    grams = [(w @ w.transpose(1, 2)).float() for w in grams]  # (H, hd, hd): W_O^h^T W_O^h

    def on_input(i):
        def hook(mod, args, kwargs):
            inputs[i] = args[0] if args else kwargs["x"]
        return hook

    def on_heads(i):
        def hook(mod, args):
            o = args[0]  # (B, T, H*hd): every head's output (gates 1)
            o = o.reshape(-1, H, hd).float()
            sq = torch.einsum("nhe,hef,nhf->nh", o, grams[i], o).clamp_min(0)
            y = (sq.sqrt() + 1e-6).log().double()  # (N, H)
            x = inputs.pop(i).reshape(-1, D).double()
            f = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)  # (N, D+1)
            xtx[i] += f.T @ f
            xty[i] += f.T @ y
            yty[i] += (y * y).sum(0)
            total[i] += sq.sqrt().double().sum(0)
        return hook

    backends = [a.cfg.backend for a in attns]
    handles = []
    for i, a in enumerate(attns):
        handles.append(a.register_forward_pre_hook(on_input(i), with_kwargs=True))
        handles.append(a.o_proj.register_forward_pre_hook(on_heads(i)))
    was_training = model.training
    set_backend(model, "masked")
    model.eval()
    t0 = time.perf_counter()
    try:
        for s in range(0, len(ids_NT), batch_size):
            model(input_ids=ids_NT[s:s + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
        for a, b in zip(attns, backends):
            a.set_backend(b)
        model.train(was_training)
    n = ids_NT.numel()
    return CalibrationStats(tokens=n, mean_norm=(total / n).float(), xtx=xtx, xty=xty, yty=yty,
                            seconds=time.perf_counter() - t0)


def fit(stats: CalibrationStats, ridge: float = 1e-4, intercept: bool = True) -> RouterFit:
    """Per layer, ridge least squares of log ||c_h|| on [x, 1] (``ridge`` * tokens on the weights,
    not the intercept); ``intercept=False`` fits on x alone (the ``two_stage`` router has no bias)."""
    if not ridge >= 0:
        raise ValueError(f"ridge={ridge!r} must be >= 0")
    L, F, H = stats.xty.shape
    D, n = F - 1, stats.tokens
    weights, biases, r2 = [], [], []
    for i in range(L):
        cols = slice(None) if intercept else slice(0, D)
        A = stats.xtx[i][cols, cols].clone()
        A.diagonal()[:D] += ridge * n
        B = stats.xty[i][cols]
        W = torch.linalg.solve(A, B)  # (F or D, H)
        sse = stats.yty[i] - 2 * (W * B).sum(0) + (W * (A @ W)).sum(0) - ridge * n * (W[:D] ** 2).sum(0)
        mean = stats.xty[i][D] / n
        sst = stats.yty[i] - n * mean**2
        r2.append((1 - sse / sst.clamp_min(1e-12)).float())
        weights.append(W[:D].T.float())
        biases.append(W[D].float() if intercept else torch.zeros(H))
    return RouterFit(torch.stack(weights), torch.stack(biases), torch.stack(r2))


# ---------------------------------------------------------------------------------------------
# calibration text


def calibration_ids(text: str, tokenizer: Any, num_tokens: int, seq_len: int = 512, seed: int = 0,
                    vocab_size: Optional[int] = None) -> tuple[Tensor, dict]:
    """(windows (N, seq_len), description): ``ceil(num_tokens / seq_len)`` windows drawn at seeded
    random starts from the *train* split of ``text`` (a moh token directory, or a corpus / text
    files / folder tokenised with ``tokenizer``)."""
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"--calib-tokens {num_tokens!r} must be a positive integer")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"--calib-seq {seq_len!r} must be an integer >= 2")
    root = Path(text)
    if (root / "meta.json").is_file():
        ids, info = _token_dir(root, vocab_size)
    else:
        ids, info = _corpus(text, tokenizer, need=max(num_tokens * 50, 1 << 20))
    if len(ids) < seq_len + 1:
        raise ValueError(f"calibration text {text!r} has {len(ids)} train tokens, fewer than --calib-seq {seq_len}")
    if num_tokens > len(ids):
        raise ValueError(f"--calib-tokens {num_tokens} is more than the {len(ids)} train tokens of calibration text "
                         f"{text!r} (windows would repeat the same text); give at most {len(ids)}")
    count = math.ceil(num_tokens / seq_len)
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.integers(0, len(ids) - seq_len + 1, size=count))
    windows = torch.from_numpy(np.stack([np.asarray(ids[s:s + seq_len], dtype=np.int64) for s in starts]))
    info.update(windows=count, seq_len=seq_len, tokens=count * seq_len, seed=seed, split="train")
    return windows, info


def _token_dir(root: Path, vocab_size: Optional[int]):
    from moh.data.text.tokens import check_token_file, read_meta

    meta = read_meta(root)
    if vocab_size is not None and int(meta["vocab_size"]) > vocab_size:
        raise ValueError(f"token directory {str(root)!r} uses {meta['vocab_size']} token ids; the model has "
                         f"vocab_size={vocab_size} (tokenise the text with the model's tokenizer)")
    path, n = check_token_file(root, meta, "train")
    ids = np.memmap(path, dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r", shape=(n,))
    return ids, {"kind": "tokens", "path": str(root.resolve()), "train_tokens": int(n),
                 "tokenizer_sha256": meta.get("tokenizer", {}).get("sha256")}


def _corpus(text: str, tokenizer: Any, need: int):
    from moh.data.text.corpus import SplitRule, open_corpus

    if tokenizer is None:
        raise ValueError(f"calibration text {text!r} is text, and the source model has no tokenizer; pass a moh "
                         f"token directory (moh data tokenize) instead")
    corpus = open_corpus([text])
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    docs = 0
    for doc in corpus.split("train", SplitRule()):
        ids.extend(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        docs += 1
        if len(ids) >= need:
            break
    return np.asarray(ids, dtype=np.int64), {"kind": "text", "path": str(Path(text).resolve()), "documents": docs,
                                             "train_tokens": len(ids), "split_rule": SplitRule().to_dict()}


__all__ = ["CalibrationStats", "RouterFit", "collect", "fit", "calibration_ids"]
