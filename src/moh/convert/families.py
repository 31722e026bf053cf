"""Source model families ``moh convert`` accepts, each as (config mapping, tensor-name mapping).

Every supported family is the LLaMA decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention) with
small differences, so each maps onto ``moh.hf.MoHLMConfig`` field for field and reuses the LLaMA
tensor names of ``moh.hf.convert``:

==========  ============================================================================
llama       ``LlamaForCausalLM`` (SmolLM2, LLaMA 2/3, TinyLlama): ``moh.hf.llama_config_to_moh``
mistral     ``MistralForCausalLM``: LLaMA's fields; a ``sliding_window`` shorter than the
            context caps ``max_position_embeddings`` at the window (moh attends to the whole
            context; up to the window length the two are the same function)
qwen2       ``Qwen2ForCausalLM``: biases on q, k, v (not on o); sliding window as Mistral's
            when ``use_sliding_window``
moh         a moh model (``MoHForCausalLM``), e.g. after plain continued pretraining: its
            weights are taken as they are and its router is replaced
==========  ============================================================================

Refused with the reason: Gemma-3 (sandwich norms around attention and MLP, ``1 + w`` RMSNorm
weights, embeddings scaled by sqrt(hidden), GELU MLP, ``query_pre_attn_scalar``, qk-norm, and
local sliding-window layers interleaved with global ones at two RoPE bases: not moh's decoder) and
every other architecture.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

from moh.hf.configuration import MoHLMConfig
from moh.hf.convert import LLAMA_FIELDS, llama_key_to_moh

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple  # config.model_type values
    architecture: str  # the transformers class
    to_config: Callable[[Any], tuple[MoHLMConfig, list[str]]]  # hf config -> (moh config, notes)
    key_to_moh: Callable[[str], Optional[str]]  # source tensor name -> moh name (None: dropped)


def _llama_like(hf_config: Any, **fixed: Any) -> MoHLMConfig:
    data = {name: copy.deepcopy(getattr(hf_config, name)) for name in LLAMA_FIELDS if hasattr(hf_config, name)}
    data["rope_parameters"] = copy.deepcopy(dict(hf_config.rope_parameters))
    data.update(fixed)
    data["router"] = "all"
    return MoHLMConfig(**data)


def _window_cap(hf_config: Any, window: Optional[int], notes: list[str]) -> dict:
    ctx = hf_config.max_position_embeddings
    if window is None or window >= ctx:
        return {}
    notes.append(f"sliding_window={window} < max_position_embeddings={ctx}: moh attends to the whole context, so "
                 f"the converted model's context is capped at {window} tokens (where both compute the same)")
    return {"max_position_embeddings": int(window)}


def llama_config(hf_config: Any) -> tuple[MoHLMConfig, list[str]]:
    if getattr(hf_config, "pretraining_tp", 1) not in (1, None):
        return _llama_like(hf_config), [f"pretraining_tp={hf_config.pretraining_tp} ignored (it only splits matmuls)"]
    return _llama_like(hf_config), []


def mistral_config(hf_config: Any) -> tuple[MoHLMConfig, list[str]]:
    notes: list[str] = []
    cap = _window_cap(hf_config, getattr(hf_config, "sliding_window", None), notes)
    return _llama_like(hf_config, **cap), notes


def qwen2_config(hf_config: Any) -> tuple[MoHLMConfig, list[str]]:
    notes: list[str] = []
    window = hf_config.sliding_window if getattr(hf_config, "use_sliding_window", False) else None
    cap = _window_cap(hf_config, window, notes)
    return _llama_like(hf_config, attention_bias=True, attention_out_bias=False, **cap), notes


def moh_config(hf_config: Any) -> tuple[MoHLMConfig, list[str]]:
    notes = [] if hf_config.router == "all" else [f"the source's router {hf_config.router!r} and its parameters "
                                                  "are replaced"]
    return hf_config.with_overrides("moh source", router="all", num_shared=0, top_k=None, layer_heads=None), notes


def moh_key(key: str) -> Optional[str]:
    return None if ".attn.router." in key else key


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", ("llama",), "LlamaForCausalLM", llama_config, llama_key_to_moh),
    Family("mistral", ("mistral",), "MistralForCausalLM", mistral_config, llama_key_to_moh),
    Family("qwen2", ("qwen2",), "Qwen2ForCausalLM", qwen2_config, llama_key_to_moh),
    Family("moh", ("moh",), "MoHForCausalLM", moh_config, moh_key),
)}

REFUSED = {
    "gemma3": "Gemma-3 does not fit moh's decoder: sandwich norms around attention and MLP, (1 + w) RMSNorm "
              "weights, embeddings scaled by sqrt(hidden_size), a GELU MLP, query_pre_attn_scalar, qk-norm and "
              "interleaved sliding-window / global layers with two RoPE bases",
}
REFUSED["gemma3_text"] = REFUSED["gemma3"]


def supported() -> list[str]:
    return [f"{f.name} ({f.architecture})" for f in FAMILIES.values()]


def family_of(hf_config: Any) -> Family:
    """The family of a transformers config; ValueError naming the model type and the supported ones."""
    kind = getattr(hf_config, "model_type", None)
    for fam in FAMILIES.values():
        if kind in fam.model_types:
            return fam
    why = f" ({REFUSED[kind]})" if kind in REFUSED else ""
    raise ValueError(f"model_type={kind!r} cannot be converted{why}; supported families: {', '.join(supported())}")


__all__ = ["Family", "FAMILIES", "family_of", "supported"]
