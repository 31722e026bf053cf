"""``convert``: a pretrained causal LM -> a moh ``MoHForCausalLM`` with a head split and a router.

Steps (each reported in ``Conversion.report``):

1. read the source (``moh.convert.sources``), map its configuration and tensor names
   (``moh.convert.families``): a moh model with router ``all`` that computes the same function;
2. optionally calibrate on train text (``moh.convert.calibrate``): per head and token the size of
   its contribution to the attention output, and a least-squares predictor of it;
3. reorder each layer's heads so the shared ones come first (``moh.convert.heads``; exact);
4. build the model with the split and the router, load the weights, and initialise the router:

   * ``calibrated``: the fitted predictor (needs calibration text);
   * ``two_stage`` (the paper's learned router): shared and balance weights 0 (their gates are
     exactly 1); routed weights 0 (every gate exactly 1: with every head kept, the original
     model), or, with calibration text and heads to drop, the predictor without intercept scaled
     so its scores spread by about ``TWO_STAGE_SPREAD``: the calibrated head choice with gates
     within a few percent of 1;
   * ``query_norm`` (the paper's parameter-free router) and ``all``: nothing to initialise.

5. check, with every head (router ``all``), the moh model's logits against the source's (unless
   the source is a moh model that routes) and the reordered against the original head order.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from moh.convert import calibrate as cal
from moh.convert import heads as hs
from moh.convert.sources import Source, load_source

log = logging.getLogger(__name__)

TWO_STAGE_SPREAD = 0.05  # std of two_stage's routed logits at initialisation (gates within ~5% of 1)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Conversion:
    model: Any  # MoHForCausalLM
    tokenizer: Optional[Any]
    report: dict = field(default_factory=dict)

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write the model directory: config.json + model.safetensors (``save_pretrained``), the
        tokenizer, and ``conversion.json`` (the report). An existing non-empty ``out`` is refused
        unless ``overwrite``."""
        import json

        from moh.data.text._io import atomic_write_text

        out = check_output(out, overwrite)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)
        self.report["output"] = str(out.resolve())
        atomic_write_text(out / "conversion.json", json.dumps(self.report, indent=1) + "\n")
        return out


def check_output(out: str | Path, overwrite: bool = False) -> Path:
    """``out`` as a Path when a model directory can be written there; ValueError naming it when
    it is empty, a file or a symbolic link, not empty (unless ``overwrite``), or not writable.
    Called before the conversion's work, and again by ``save``."""
    import os

    from moh.data.text._io import check_out_dir

    out = check_out_dir(out, "output")  # empty, a symbolic link, a file
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output {str(out)!r} exists and is not empty (pass --overwrite to replace its files)")
    parent = next((p for p in [out, *out.absolute().parents] if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output {str(out)!r}: {str(parent)!r} is not a writable directory")
    return out


def split_for(heads: str, layer_heads: Any, shared: Optional[int], depth: int, H: int, G: int) -> list[tuple[int, int]]:
    """Per-layer (S, K) from --heads / --layer-heads / --shared."""
    if layer_heads is not None:
        if shared is not None:
            raise ValueError("--shared and --layer-heads exclude each other (--layer-heads gives S per layer)")
        return hs.parse_layer_heads(layer_heads, depth, H)
    active = hs.parse_heads(heads, H)
    if shared is None:
        S, K = hs.default_split(active, H, H // G)
    else:
        if not isinstance(shared, int) or not 0 <= shared <= active:
            raise ValueError(f"--shared {shared!r} must be an integer in [0, active heads={active}]")
        S, K = shared, active - shared
    return [(S, K)] * depth


def convert(src: str | Source, *, heads: str = "75%", layer_heads: Any = None, shared: Optional[int] = None,
            router: Optional[str] = None, calibrate: Optional[str] = None, calib_ids: Optional[Tensor] = None,
            calib_tokens: int = 16384, calib_seq: int = 512, ridge: float = 1e-4, backend: str = "sparse",
            gguf_file: Optional[str] = None, dtype: str = "auto", batch_size: int = 4, seed: int = 0) -> Conversion:
    """Convert ``src`` (a path, hub id, or an already loaded ``Source``); see the module doc.
    ``calibrate``: calibration text (token dir / corpus), or ``calib_ids`` (N, T) token windows."""
    from moh.hf.modeling import MoHForCausalLM
    from moh.registry import BACKENDS, ROUTERS

    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}; valid choices: auto, {', '.join(DTYPES)}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"--batch-size {batch_size!r} must be a positive integer")
    if not ridge >= 0 or ridge == float("inf"):
        raise ValueError(f"--ridge {ridge!r} must be a finite number >= 0")
    BACKENDS.get(backend)
    t0 = time.perf_counter()
    source = src if isinstance(src, Source) else load_source(str(src), gguf_file=gguf_file)
    if router == "keep":
        return _keep(source, dtype, t0, heads_given=(heads, layer_heads, shared, calibrate, calib_ids))
    hf = source.model
    base_cfg, notes = source.family.to_config(hf.config)
    base_cfg = base_cfg.with_overrides("conversion", backend=backend)
    L, H, G, hd = base_cfg.num_hidden_layers, base_cfg.num_attention_heads, base_cfg.num_key_value_heads, base_cfg.head_dim
    split = split_for(heads, layer_heads, shared, L, H, G)
    every_head = all(S + K == H for S, K in split)
    router = router or ("all" if every_head and layer_heads is None else "calibrated")
    ROUTERS.get(router)  # validates the name
    calibrating = calibrate is not None or calib_ids is not None
    if router == "calibrated" and not calibrating:
        raise ValueError("router 'calibrated' needs calibration text: pass --calibrate TEXT_OR_TOKEN_DIR "
                         "(or choose --router query_norm / two_stage)")

    sd = {}
    for key, tensor in hf.state_dict().items():
        new = source.family.key_to_moh(key)
        if new is not None:
            sd[new] = tensor.detach().float()
    base = MoHForCausalLM(base_cfg).float().eval()
    _load(base, sd, "the source model")
    probe = torch.randint(0, base_cfg.vocab_size, (1, min(32, base_cfg.max_position_embeddings)),
                          generator=torch.Generator().manual_seed(0))
    before = _logits(base, probe)

    stats, fitted, calib_info = None, None, None
    if calibrating:
        if calib_ids is None:
            calib_ids, calib_info = cal.calibration_ids(calibrate, source.tokenizer, calib_tokens, calib_seq, seed,
                                                        vocab_size=base_cfg.vocab_size)
        else:
            calib_info = {"kind": "ids", "windows": len(calib_ids), "seq_len": calib_ids.shape[1],
                          "tokens": calib_ids.numel()}
        stats = cal.collect(base, calib_ids, batch_size)
        fitted = cal.fit(stats, ridge, intercept=router != "two_stage")
        calib_info.update(seconds=round(stats.seconds, 1), ridge=ridge,
                          r2_mean=round(float(fitted.r2.mean()), 4),
                          r2_per_layer=[round(float(v), 3) for v in fitted.r2.mean(1)],
                          mean_contribution=[[round(float(v), 4) for v in row] for row in stats.mean_norm])
        log.info("calibration: %d tokens in %.0f s, R^2 of log contribution %.3f", stats.tokens, stats.seconds,
                 float(fitted.r2.mean()))

    orders = [hs.shared_order(None if stats is None else stats.mean_norm[i], S, H, G) for i, (S, _) in enumerate(split)]
    for i, order in enumerate(orders):
        hs.permute_layer(sd, f"model.layers.{i}.attn.", order, H, G, hd)
    _load(base, sd, "the reordered weights")
    check = _parity(hf, before, _logits(base, probe), probe, every_head=getattr(hf.config, "router", "all") == "all")
    del base

    moh_overrides: dict[str, Any] = {"router": router}
    if layer_heads is None and len(set(split)) == 1:
        moh_overrides.update(num_shared=split[0][0], top_k=split[0][1])
    else:
        moh_overrides.update(layer_heads=[list(p) for p in split])
    cfg = base_cfg.with_overrides("conversion", **moh_overrides)
    model = MoHForCausalLM(cfg).float().eval()
    new = _load(model, sd, "the converted model", allow_new=".attn.router.")
    _init_router(model, router, split, orders, fitted, stats)
    if dtype != "auto" or source.info.get("dtype") in DTYPES:
        model = model.to(DTYPES[dtype if dtype != "auto" else source.info["dtype"]])

    n_src = sum(p.numel() for p in hf.parameters())
    n_moh = sum(p.numel() for p in model.parameters())
    n_router = sum(p.numel() for n, p in model.named_parameters() if ".attn.router." in n)
    report = {
        "source": source.info,
        "replaced": {"attention_layers": L, "from": f"{source.info['architecture']} self-attention",
                     "to": "moh.MoHAttention", "router": router, "backend": backend},
        "heads": {"num_heads": H, "num_kv_heads": G, "head_dim": hd, "layer_heads": [list(p) for p in split],
                  "active_per_token": [S + K for S, K in split], "active_fraction": round(cfg.active_fraction, 4),
                  "shared_rule": "calibrated: key/value groups with the largest mean contribution first "
                                 "(moh.convert.heads)" if stats is not None else "original order (first S heads)",
                  "order": orders},
        "parameters": {"source": n_src, "moh": n_moh, "added": n_moh - n_src, "router": n_router},
        "added": new,
        "tensors_copied": len(sd),
        "calibration": calib_info,
        "router_init": _router_init_text(router, fitted is not None),
        "check": check,
        "notes": notes,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    log.info("converted %s: %d layers, router %s, heads %s per token (%.0f%%), %d parameters added",
             source.info["architecture"], L, router, sorted({S + K for S, K in split}), 100 * cfg.active_fraction,
             n_moh - n_src)
    return Conversion(model, source.tokenizer, report)


def _keep(source: Source, dtype: str, t0: float, heads_given) -> Conversion:
    """``router="keep"``: a moh source (a run: LoRA merged) written as it is."""
    if source.family.name != "moh":
        raise ValueError(f"--router keep keeps a moh model's own router; {source.info['architecture']} has none "
                         f"(choose calibrated, two_stage, query_norm or all)")
    heads, layer_heads, shared, calibrate, calib_ids = heads_given
    if layer_heads is not None or shared is not None or calibrate is not None or calib_ids is not None:
        raise ValueError("--router keep keeps the source's heads: --layer-heads, --shared and --calibrate do not apply")
    model = source.model
    if dtype != "auto":
        model = model.to(DTYPES[dtype])
    cfg = model.config
    report = {"source": source.info, "replaced": {"attention_layers": 0, "from": "-", "to": "-", "router": cfg.router,
                                                  "backend": cfg.backend},
              "heads": {"num_heads": cfg.num_attention_heads, "num_kv_heads": cfg.num_key_value_heads,
                        "head_dim": cfg.head_dim,
                        "layer_heads": [[a.num_shared, a.top_k] for a in cfg.attention_configs()],
                        "active_fraction": round(cfg.active_fraction, 4), "shared_rule": "kept", "order": None},
              "parameters": {"source": source.info["parameters"], "moh": source.info["parameters"], "added": 0,
                             "router": sum(p.numel() for n, p in model.named_parameters() if ".attn.router." in n)},
              "added": [], "tensors_copied": len(model.state_dict()), "calibration": None,
              "router_init": "kept from the source", "check": None, "notes": ["written as it is (router keep)"],
              "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
              "seconds": round(time.perf_counter() - t0, 1)}
    return Conversion(model, source.tokenizer, report)


def _load(model, sd: dict[str, Tensor], what: str, allow_new: Optional[str] = None) -> list[str]:
    """Load ``sd`` into ``model``; returns the model's parameters ``sd`` lacks (only names with
    ``allow_new`` may be missing); anything else that does not fit is a ValueError."""
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (moh {tuple(own[k].shape)})" for k, v in sd.items() if k in own and v.shape != own[k].shape]
    unexpected = sorted(set(sd) - set(own))
    missing = sorted(set(own) - set(sd))
    new = [k for k in missing if allow_new and allow_new in k]
    lacking = sorted(set(missing) - set(new))
    if wrong or unexpected or lacking:
        raise ValueError(f"{what} does not fit the moh model: wrong shape {wrong}, no place for {unexpected}, "
                         f"missing {lacking}")
    with torch.no_grad():
        model.load_state_dict(sd, strict=False)
    return new


@torch.no_grad()
def _logits(model, ids: Tensor) -> Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def _parity(hf, before: Tensor, after: Tensor, ids: Tensor, every_head: bool) -> dict:
    """Max |logit difference| on random ids: the source vs the moh model with every head (when the
    source itself uses every head), and the moh model before vs after reordering its heads."""
    out = {"tokens": ids.shape[1], "max_abs_logit_diff_every_head": None,
           "max_abs_logit_diff_reordered": float((before - after).abs().max()), "scale": float(after.abs().max())}
    if every_head:
        out["max_abs_logit_diff_every_head"] = float((hf(input_ids=ids).logits.float() - after).abs().max())
    return out


def _init_router(model, router: str, split, orders, fitted: Optional[cal.RouterFit],
                 stats: Optional[cal.CalibrationStats]) -> None:
    with torch.no_grad():
        for i, (blk, (S, K), order) in enumerate(zip(model.model.layers, split, orders)):
            r = blk.attn.router
            routed = torch.tensor(order[S:], dtype=torch.long)
            if router == "calibrated" and r.score is not None:
                r.score.weight.copy_(fitted.weight[i][routed])
                r.score.bias.copy_(fitted.bias[i][routed])
            elif router == "two_stage":
                for lin in (r.w_shared, r.w_balance, r.w_routed):
                    if lin is not None:
                        lin.weight.zero_()
                if fitted is not None and r.w_routed is not None and K < len(order) - S:  # a choice to make
                    w = fitted.weight[i][routed]
                    spread = _head_spread(w, stats.xtx[i], stats.tokens)
                    r.w_routed.weight.copy_(w * (TWO_STAGE_SPREAD / max(spread, 1e-8)))


def _head_spread(w_ED: Tensor, xtx: Tensor, n: int) -> float:
    """RMS over tokens of the scores' deviation from their mean across heads, sqrt(mean_h
    E[((w_h - mean w) x)^2]), from the calibration second moments E[x x^T]."""
    D = w_ED.shape[1]
    c = (w_ED - w_ED.mean(0, keepdim=True)).double()
    second = xtx[:D, :D] / n
    return float(((c @ second) * c).sum(1).mean().clamp_min(0).sqrt())


def _router_init_text(router: str, calibrated: bool) -> str:
    if router == "calibrated":
        return "score = W x + b: least-squares predictor of log ||head_h(x) W_O^h|| fitted on the calibration text"
    if router == "two_stage":
        return ("shared/balance weights 0 (gates 1); routed weights " +
                (f"= calibrated predictor (no intercept) scaled to spread {TWO_STAGE_SPREAD}" if calibrated
                 else "0 (every gate 1; ties keep the first top-k routed heads)"))
    if router == "query_norm":
        return "parameter-free (query L2 norms, paper Sec. 4.4)"
    return "none"


__all__ = ["Conversion", "check_output", "convert", "split_for", "TWO_STAGE_SPREAD"]
