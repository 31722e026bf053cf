"""moh's decoder language model as transformers models: ``MoHModel`` (the decoder body) and
``MoHForCausalLM`` (body + LM head, ``generate()``, the loss). The one decoder of moh: the presets
``llm-*`` / ``moh-llm-*`` (``moh.models.llm``) build these classes.

Architecture (LLaMA): token embedding, ``num_hidden_layers`` x ``moh.layers.block.Block``
(RMSNorm -> ``MoHAttention`` (causal, RoPE, grouped-query) -> residual, RMSNorm -> SwiGLU ->
residual), RMSNorm, LM head (tied to the embedding by default). Parameter names:
``model.embed_tokens``, ``model.layers.{i}.{norm1, attn.{q,k,v,o}_proj, attn.router, norm2,
mlp.{gate,up,down}_proj}``, ``model.norm``, ``lm_head`` (``moh.hf.convert`` maps LLaMA's names).

Outputs follow transformers' MoE convention (Mixtral): ``output_router_logits`` /
``router_aux_loss_coef`` / ``aux_loss``; the rule is in ``moh.hf.configuration``. They also carry
moh's ``task_loss``, ``routings`` (one ``Routing`` per layer) and ``metrics`` (name -> (sum, count),
``moh.models.base.standard_metrics``), which the training engine and ``moh.analysis`` read.

Shape legend: B batch, T new tokens, S cached + new positions, D width, V vocabulary, E routed heads.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Cache, DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils import ModelOutput

from moh.config import MoHConfig
from moh.core.attention import MoHAttention
from moh.core.routing import Routing
from moh.hf.cache import LayerCache
from moh.hf.compat import CACHE_NAME, output_cache, pick_cache
from moh.hf.configuration import MoHLMConfig
from moh.layers.block import Block
from moh.layers.mlp import SwiGLU
from moh.layers.norm import RMSNorm
from moh.layers.rope import RotaryEmbedding
from moh.models.base import IGNORE_INDEX, standard_metrics, with_aux_loss

log = logging.getLogger(__name__)


@dataclass
class MoHModelOutput(ModelOutput):
    """The decoder body's output. last_hidden_state (B, T, D) after the final norm;
    hidden_states: the embeddings and every layer's output (num_hidden_layers + 1, the last one
    normed), when asked; routings: one ``Routing`` per layer; token_mask (B, T): real tokens."""

    last_hidden_state: Optional[Tensor] = None
    if CACHE_NAME == "cache":  # transformers >= 5.24 (moh.hf.compat)
        cache: Optional[Any] = None
    else:
        past_key_values: Optional[Any] = None
    hidden_states: Optional[tuple[Tensor, ...]] = None
    attentions: Optional[tuple[Tensor, ...]] = None
    routings: Optional[list[Routing]] = None
    token_mask: Optional[Tensor] = None


@dataclass
class MoHCausalLMOutput(ModelOutput):
    """``MoHForCausalLM``'s output: Mixtral's ``MoeCausalLMOutputWithPast`` fields plus moh's.

    loss:          task_loss + router_aux_loss_coef * aux_loss (the balance term only with
                   output_router_logits), None without labels. What the engine minimises.
    aux_loss:      load-balance loss (paper Eq. 7), mean over layers with learned routers.
    logits:        (B, T, V) (the last ``logits_to_keep`` positions when that is set).
    router_logits: per layer, the router's probabilities over its routed heads (B, T, E) (None for
                   layers whose router has none, e.g. ``all``), with output_router_logits.
    task_loss:     the next-token cross-entropy alone; metrics: name -> (sum, count), with labels or
                   in training (empty otherwise: not made per decoding step).
    """

    loss: Optional[Tensor] = None
    aux_loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    if CACHE_NAME == "cache":  # transformers >= 5.24 (moh.hf.compat)
        cache: Optional[Any] = None
    else:
        past_key_values: Optional[Any] = None
    hidden_states: Optional[tuple[Tensor, ...]] = None
    attentions: Optional[tuple[Tensor, ...]] = None
    router_logits: Optional[tuple[Optional[Tensor], ...]] = None
    task_loss: Optional[Tensor] = None
    metrics: Optional[dict] = None
    routings: Optional[list[Routing]] = None
    token_mask: Optional[Tensor] = None


def rope_frequencies(config: MoHLMConfig) -> tuple[Tensor, float]:
    """(inv_freq (head_dim/2,), attention_scaling) of the config's RoPE, as transformers computes
    them (``ROPE_INIT_FUNCTIONS`` for scaled types: linear, llama3, yarn)."""
    params = config.rope_parameters or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        hd, theta = config.head_dim, float(params.get("rope_theta", 10000.0))
        return 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd)), 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
    return inv_freq.float(), float(scaling)


def build_block(config: MoHLMConfig, attn_cfg: MoHConfig) -> Block:
    """One decoder layer: moh's one ``Block`` with an MoHAttention (``attn_cfg``; RoPE as the
    config says), SwiGLU and RMSNorms."""
    attn = MoHAttention(attn_cfg)
    inv_freq, scaling = rope_frequencies(config)
    attn.rotary = RotaryEmbedding(attn_cfg.head_dim, inv_freq=inv_freq, attention_scaling=scaling)
    D, eps = config.hidden_size, config.rms_norm_eps
    return Block(attn, SwiGLU(D, config.intermediate_size, bias=config.mlp_bias), RMSNorm(D, eps), RMSNorm(D, eps))


class MoHPreTrainedModel(PreTrainedModel):
    config: MoHLMConfig
    config_class = MoHLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    supports_gradient_checkpointing = False
    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_attention_backend = False

    @property
    def cfg(self) -> MoHLMConfig:
        """The config, under the name every moh model family uses (``model.cfg``)."""
        return self.config

    def _init_weights(self, module: nn.Module) -> None:
        """Linear and embedding weights ~ N(0, initializer_range), biases 0, norms 1 (the router's
        linears too, as moh's decoder always did); RoPE frequencies from the config (they are
        buffers, not saved: a model loaded from a meta-device skeleton gets them here)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):
            inv_freq, scaling = rope_frequencies(self.config)
            init.copy_(module.inv_freq, inv_freq)
            module.attention_scaling = scaling

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' ``from_pretrained``, made strict: weights that do not fit the model
        (missing, unexpected or mis-shaped tensors) are a ValueError naming them, instead of a
        warning and random initialisation; a damaged safetensors file is a ValueError naming
        it; a config of another model type is a ValueError (see ``MoHLMConfig.from_dict``)."""
        from moh.hf.loading import strict_from_pretrained

        return strict_from_pretrained(super().from_pretrained, cls, pretrained_model_name_or_path, *args, **kwargs)


class MoHModel(MoHPreTrainedModel):
    """The decoder body: embeddings, the blocks, the final norm."""

    def __init__(self, config: MoHLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(build_block(config, a) for a in config.attention_configs())
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        cache: Optional[Any] = None,
        inputs_embeds: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        past_key_values: Optional[Any] = None,
        **kwargs: Any,
    ) -> MoHModelOutput:
        """input_ids (B, T) or inputs_embeds (B, T, D). attention_mask (B, S): 1 for real tokens,
        0 for padding (S = cached + new positions; left padding for batched prompts).
        position_ids (B, T): RoPE positions (default: real tokens counted from 0, so a left-padded
        prompt gets the positions of the unpadded one). cache (or its pre-5.24 name
        past_key_values): a transformers ``Cache``; with use_cache and none given a
        ``DynamicCache`` is made (not while training)."""
        past_key_values = pick_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        # values are checked where that costs no device sync (CPU tensors, not while compiling): on an
        # accelerator a bad id is the embedding's device-side assert, as in transformers' own models
        check_values = (input_ids if input_ids is not None else inputs_embeds).device.type == "cpu" \
            and not torch.compiler.is_compiling()
        if input_ids is not None:  # named here, not an IndexError inside the embedding
            if input_ids.dtype not in (torch.long, torch.int, torch.short, torch.uint8):
                raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
            if check_values and input_ids.numel() and (int(input_ids.min()) < 0
                                                       or int(input_ids.max()) >= self.config.vocab_size):
                raise ValueError(f"input_ids run from {int(input_ids.min())} to {int(input_ids.max())}; the model's "
                                 f"token ids are 0 .. vocab_size - 1 = {self.config.vocab_size - 1}")
        if check_values and attention_mask is not None and attention_mask.dtype != torch.bool and attention_mask.numel():
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):  # a 2 would count twice in positions
                raise ValueError(f"attention_mask holds values other than 0 and 1: "
                                 f"{sorted(set(attention_mask.unique().tolist()) - {0, 1})[:5]}")
        if output_attentions:
            raise ValueError("output_attentions=True: moh's attention backends never form the attention weights")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T = x.shape[:2]
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise ValueError(f"past_key_values must be a transformers Cache (e.g. DynamicCache), got "
                             f"{type(past_key_values).__name__}; tuple caches are not supported")
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        self._check_length(past, T)
        positions = self._positions(position_ids, attention_mask, past, B, T, x.device)
        key_mask = _key_mask(attention_mask)
        hidden = [x] if output_hidden_states else None
        routings = []
        for i, block in enumerate(self.layers):
            layer_cache = LayerCache(past_key_values, i) if past_key_values is not None else None
            x, routing = block(x, key_mask, layer_cache, positions)
            routings.append(routing)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x
        token_mask = None if attention_mask is None or attention_mask.dim() != 2 else attention_mask[:, -T:].bool()
        return MoHModelOutput(last_hidden_state=x, **{CACHE_NAME: past_key_values if use_cache else None},
                              hidden_states=tuple(hidden) if hidden is not None else None, routings=routings,
                              token_mask=token_mask)

    def _check_length(self, past: int, T: int) -> None:
        if past + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {past + T} ({past} cached + {T} new tokens) exceeds the model's "
                             f"context, max_position_embeddings={self.config.max_position_embeddings}")

    @staticmethod
    def _positions(position_ids: Optional[Tensor], attention_mask: Optional[Tensor], past: int, B: int, T: int,
                   device) -> Tensor:
        """RoPE positions (B, T)."""
        if position_ids is not None:
            return position_ids.expand(B, T) if position_ids.shape[0] == 1 else position_ids
        if attention_mask is not None and attention_mask.dim() == 2:
            # left padding: count real tokens only, so a padded prompt matches the unpadded one
            return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]
        return torch.arange(past, past + T, device=device).expand(B, T)


def _key_mask(attention_mask: Optional[Tensor]) -> Optional[Tensor]:
    """A (B, S) padding mask, or None when every position is real (the backends' no-mask path)."""
    if attention_mask is None or (attention_mask.dim() == 2 and bool(attention_mask.bool().all())):
        return None
    return attention_mask


class MoHForCausalLM(MoHPreTrainedModel, GenerationMixin):
    """A MoH decoder language model: ``MoHModel`` + LM head; transformers' ``generate()``."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoHLMConfig):
        super().__init__(config)
        self.model = MoHModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def save_run_files(self, out_dir, data=None) -> list[str]:
        """Called by the training engine at the end of a run: makes the run directory a
        transformers model directory (config.json, generation_config.json, the training data's
        tokenizer; ``moh.hf.run``)."""
        from moh.hf.run import save_run_files

        return save_run_files(self, out_dir, data)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def generate(self, *args: Any, **kwargs: Any):
        """transformers' ``generate``; a search setting it would divide by (``num_beams=0``) or
        accept silently (``top_p=1.5``) is a ValueError naming it first."""
        check_generation_kwargs(kwargs)
        # no balance loss per decoding step (generate never reads it); pass True to have it computed
        kwargs.setdefault("output_router_logits", False)
        return super().generate(*args, **kwargs)

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any):
        """transformers' ``save_pretrained``; a path that is a file is a ValueError (transformers
        only logs it and returns, having written nothing)."""
        from pathlib import Path

        if Path(save_directory).is_file():
            raise ValueError(f"save_pretrained({str(save_directory)!r}): it is a file; give a directory")
        return super().save_pretrained(save_directory, *args, **kwargs)

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        cache: Optional[Any] = None,
        inputs_embeds: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_router_logits: Optional[bool] = None,
        logits_to_keep: int = 0,
        past_key_values: Optional[Any] = None,
        **kwargs: Any,
    ) -> MoHCausalLMOutput:
        """See ``MoHModel.forward``. labels (B, T): the input ids themselves (-100 where no loss);
        position t's logits predict labels[t + 1]. logits_to_keep > 0: logits of the last that
        many positions only (prefill for generation), not with labels."""
        if labels is not None and logits_to_keep:
            raise ValueError(f"logits_to_keep={logits_to_keep} with labels: the loss needs every position's logits")
        out = self.model(input_ids, attention_mask, position_ids, pick_cache(cache, past_key_values), inputs_embeds,
                         use_cache, output_hidden_states, output_attentions)
        h = out.last_hidden_state
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)  # (B, T, V)
        task_loss = next_token_loss(logits, labels) if labels is not None else None
        routed = self.config.output_router_logits if output_router_logits is None else output_router_logits
        loss, aux = task_loss, None
        if routed:  # the balance term, added here once (moh.models.base.with_aux_loss)
            loss, aux = with_aux_loss(task_loss, out.routings, self.config.router_aux_loss_coef, out.token_mask)
        result = MoHCausalLMOutput(
            loss=loss, aux_loss=aux, logits=logits, **{CACHE_NAME: output_cache(out)},
            hidden_states=out.hidden_states, router_logits=tuple(r.probs_BTE for r in out.routings) if routed else None,
            task_loss=task_loss, metrics={}, routings=out.routings, token_mask=out.token_mask)
        if labels is not None or self.training:  # what the engine reads; not per decoding step
            result.metrics = standard_metrics(result, labels, logits.shape[0])
        return result


def check_generation_kwargs(kw: dict) -> None:
    """ValueError naming a ``generate`` keyword outside its domain (None: the default)."""
    def given(name):
        return kw.get(name) is not None

    for name in ("num_beams", "num_return_sequences", "num_beam_groups"):
        if given(name) and (not isinstance(kw[name], int) or isinstance(kw[name], bool) or kw[name] < 1):
            raise ValueError(f"generate({name}={kw[name]!r}): must be an integer >= 1")
    if given("top_p") and not (isinstance(kw["top_p"], (int, float)) and 0 < kw["top_p"] <= 1):
        raise ValueError(f"generate(top_p={kw['top_p']!r}): must be in (0, 1]")
    if given("top_k") and (not isinstance(kw["top_k"], int) or isinstance(kw["top_k"], bool) or kw["top_k"] < 0):
        raise ValueError(f"generate(top_k={kw['top_k']!r}): must be an integer >= 0 (0: off)")
    if given("temperature") and not (isinstance(kw["temperature"], (int, float)) and 0 <= kw["temperature"] < float("inf")):
        raise ValueError(f"generate(temperature={kw['temperature']!r}): must be a finite number >= 0")


def next_token_loss(logits_BTV: Tensor, labels_BT: Tensor) -> Tensor:
    """Mean cross-entropy of position t's logits against labels[t + 1], -100 ignored (float32)."""
    if labels_BT.shape != logits_BTV.shape[:2]:
        raise ValueError(f"labels have shape {tuple(labels_BT.shape)}, logits {tuple(logits_BTV.shape[:2])} positions")
    V = logits_BTV.shape[-1]
    real = labels_BT[labels_BT != IGNORE_INDEX] if labels_BT.device.type == "cpu" and not torch.compiler.is_compiling() \
        else labels_BT[:0]  # checked where that costs no device sync
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= V):
        raise ValueError(f"labels run from {int(real.min())} to {int(real.max())}; they must be token ids in "
                         f"[0, {V}) or {IGNORE_INDEX} (no loss)")
    return F.cross_entropy(logits_BTV[:, :-1].reshape(-1, V).float(), labels_BT[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


__all__ = ["MoHModel", "MoHForCausalLM", "MoHPreTrainedModel", "MoHModelOutput", "MoHCausalLMOutput",
           "rope_frequencies", "build_block", "next_token_loss"]
