"""The model a run trains: the preset (or ``hf:DIR`` converted model) of ``cfg.model``, with LoRA
adapters (PEFT) and / or only some parameters trainable.

    model:
      name: hf:runs/convert/smollm2-cal75        # a moh model directory (moh convert OUT)
      lora: {r: 16, alpha: 32, dropout: 0.0, targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}
      trainable: ["*.attn.router.*"]            # fnmatch patterns of parameter names kept trainable

* ``lora`` (empty: none): ``peft.get_peft_model`` with a ``LoraConfig`` on the named modules (moh's
  attention keeps LLaMA's names, so they are the usual ones); PEFT freezes everything else. Every
  backend computes LoRA projections exactly (``tests/core/test_lora.py``).
* ``trainable`` (empty: every parameter, or only LoRA's with ``lora``): parameters whose names
  match a pattern are trainable as well; with no LoRA, only they are.

``load_run`` builds the same model, so the saved weights (adapters included) load as they were;
``merged`` folds the adapters into plain weights (a ``MoHForCausalLM`` again).
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Any

from torch import nn

from moh.models import create_model

log = logging.getLogger(__name__)

LORA_KEYS = {"r": int, "alpha": (int, float), "dropout": (int, float), "targets": list}
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def check_lora(lora: dict) -> None:
    """ValueError naming ``model.lora.<key>`` for an unknown key or a bad value."""
    unknown = sorted(set(lora) - set(LORA_KEYS))
    if unknown:
        raise ValueError(f"unknown model.lora key(s) {[f'model.lora.{k}' for k in unknown]}; valid keys: {sorted(LORA_KEYS)}")
    r = lora.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"model.lora.r={r!r} must be an integer >= 1")
    for key in ("alpha", "dropout"):
        if key in lora and (not isinstance(lora[key], (int, float)) or isinstance(lora[key], bool) or lora[key] < 0):
            raise ValueError(f"model.lora.{key}={lora[key]!r} must be a number >= 0")
    if not 0 <= lora.get("dropout", 0.0) < 1:
        raise ValueError(f"model.lora.dropout={lora['dropout']!r} must be in [0, 1)")
    targets = lora.get("targets", DEFAULT_TARGETS)
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"model.lora.targets={targets!r} must be a non-empty list of module names")


def build_model(spec: Any) -> nn.Module:
    """``create_model(spec.name, **spec.overrides)``, then ``spec.lora`` / ``spec.trainable``."""
    model = create_model(spec.name, **spec.overrides)
    lora, trainable = getattr(spec, "lora", None) or {}, list(getattr(spec, "trainable", None) or [])
    if lora:
        check_lora(lora)
        import peft

        targets = lora.get("targets", DEFAULT_TARGETS)
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = sorted(set(targets) - present)
        if missing:
            raise ValueError(f"model.lora.targets {missing} name no module of model {spec.name!r}")
        r = lora.get("r", 8)
        config = peft.LoraConfig(r=r, lora_alpha=lora.get("alpha", 2 * r), lora_dropout=float(lora.get("dropout", 0.0)),
                                 target_modules=targets, bias="none")
        model = peft.get_peft_model(model, config)
    if trainable:
        matched = 0
        for name, p in model.named_parameters():
            hit = any(fnmatch.fnmatch(name, pat) for pat in trainable)
            if hit:
                p.requires_grad_(True)
                matched += 1
            elif not lora:
                p.requires_grad_(False)
        if not matched:
            raise ValueError(f"model.trainable {trainable} matches no parameter of model {spec.name!r}")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    if lora or trainable:
        log.info("trainable parameters: %d of %d (%.2f%%)", n_train, n_all, 100 * n_train / max(n_all, 1))
    return model


def merged(model: nn.Module) -> nn.Module:
    """The model with LoRA adapters folded into its weights (the model itself when it has none)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


__all__ = ["build_model", "merged", "check_lora", "DEFAULT_TARGETS"]
