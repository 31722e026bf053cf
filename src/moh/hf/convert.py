"""LLaMA (transformers' ``LlamaForCausalLM``) -> moh's ``MoHForCausalLM``, with the same function.

Three explicit steps, each reusable (issue 9's ``moh convert`` extends them to Mistral / Qwen2):

* ``llama_config_to_moh(llama_config, **moh)``: the ``MoHLMConfig`` expressing the LLaMA config
  field for field (GQA, head_dim, biases, rope_parameters with scaling, tied or untied
  embeddings, rms_norm_eps); router ``all`` unless ``moh`` overrides say otherwise.
* ``convert_llama_state_dict(sd)``: LLaMA tensor names -> moh's (``llama_key_to_moh``); the
  tensors themselves are not copied or changed.
* ``from_llama(model, **moh)``: both, and the weights loaded; returns the moh model and a
  ``ConversionReport`` (tensors copied, new parameters such as a learned router's, left at their
  initialisation).

With router ``all`` the moh model computes exactly what the LLaMA model does (tested: logits
equal to 1e-4, ``tests/hf/test_llama_parity.py``).
"""
from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from moh.hf.configuration import MoHLMConfig

log = logging.getLogger(__name__)

# LlamaConfig fields that carry over unchanged
LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
                "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
                "attention_bias", "attention_dropout", "mlp_bias")

# LLaMA layer submodule -> moh Block submodule
_LAYER_RENAMES = {"self_attn": "attn", "input_layernorm": "norm1", "post_attention_layernorm": "norm2", "mlp": "mlp"}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.([a-z_]+)\.(.+)$")
_SAME = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


@dataclass
class ConversionReport:
    """What ``from_llama`` did: tensors copied, parameters the source has no value for (new)."""

    source: str
    copied: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # source tensors with no counterpart (rotary caches)


def llama_config_to_moh(llama_config: Any, **moh: Any) -> MoHLMConfig:
    """The ``MoHLMConfig`` of a ``LlamaConfig`` (router ``all``: plain multi-head attention);
    ``moh``: moh fields or overrides (``router="query_norm", num_shared=..., top_k=...``)."""
    if getattr(llama_config, "pretraining_tp", 1) not in (1, None):
        log.info("pretraining_tp=%s is ignored (it only splits matmuls)", llama_config.pretraining_tp)
    data = {name: copy.deepcopy(getattr(llama_config, name)) for name in LLAMA_FIELDS if hasattr(llama_config, name)}
    data["rope_parameters"] = copy.deepcopy(dict(llama_config.rope_parameters))
    data.setdefault("router", "all")
    base = MoHLMConfig(**data)
    return base.with_overrides("llama conversion", **moh) if moh else base


def llama_key_to_moh(key: str) -> str | None:
    """A LLaMA tensor name -> moh's (None: a tensor moh does not keep, e.g. a rotary cache).
    ValueError for a name that is neither."""
    if key in _SAME:
        return key
    if key.endswith("rotary_emb.inv_freq"):
        return None
    m = _LAYER_KEY.match(key)
    if m and m.group(2) in _LAYER_RENAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_RENAMES[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"tensor {key!r} is not part of a LLaMA causal LM (LlamaForCausalLM) state dict")


def convert_llama_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """LLaMA names -> moh names, the same tensor objects (nothing is copied)."""
    out = {}
    for key, tensor in state_dict.items():
        new = llama_key_to_moh(key)
        if new is not None:
            out[new] = tensor
    return out


def from_llama(llama_model: Any, **moh: Any):
    """(``MoHForCausalLM``, ``ConversionReport``) computing what ``llama_model`` (a
    ``LlamaForCausalLM``) computes when the router is ``all`` (the default); ``moh``: overrides
    of the moh config. Parameters the source lacks (a learned router) keep their initialisation
    and are listed in the report; any other mismatch is a ValueError."""
    from moh.hf.modeling import MoHForCausalLM

    config = llama_config_to_moh(llama_model.config, **moh)
    source_sd = llama_model.state_dict()
    sd = convert_llama_state_dict(source_sd)
    dtype = next(iter(source_sd.values())).dtype
    model = MoHForCausalLM(config).to(dtype)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (moh {tuple(own[k].shape)})" for k, v in sd.items()
             if k in own and v.shape != own[k].shape]
    unexpected = sorted(set(sd) - set(own))
    if wrong or unexpected:
        raise ValueError(f"the LLaMA weights do not fit the moh model: wrong shape {wrong}, no place for {unexpected}")
    new = sorted(k for k in set(own) - set(sd) if ".attn.router." in k)
    missing = sorted(set(own) - set(sd) - set(new))
    if missing:
        raise ValueError(f"the LLaMA state dict lacks {missing}")
    with torch.no_grad():
        model.load_state_dict(sd, strict=False)
    report = ConversionReport(source=type(llama_model).__name__, copied=sorted(sd), new=new,
                              dropped=sorted(k for k in source_sd if llama_key_to_moh(k) is None))
    log.info("from_llama: %d tensors copied, %d new parameters (%s)", len(report.copied), len(new),
             ", ".join(new[:4]) + (" ..." if len(new) > 4 else ""))
    return model.eval() if not llama_model.training else model, report


__all__ = ["llama_config_to_moh", "llama_key_to_moh", "convert_llama_state_dict", "from_llama", "ConversionReport",
           "LLAMA_FIELDS"]
