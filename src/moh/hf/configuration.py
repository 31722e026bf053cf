"""``MoHLMConfig``: the configuration of moh's language models as a transformers ``PreTrainedConfig``.

Field names are transformers' own (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size``, ``rope_parameters``, ``tie_word_embeddings``, ...),
as in ``LlamaConfig``, so a LLaMA / Mistral / Qwen2 configuration is expressed field for field.
moh's head specification sits beside them (``moh.models.base.HeadSpec``'s): ``num_shared_heads``
shared heads, the top ``top_k_heads`` of the others per token (not ``top_k``: transformers reads
a config's ``top_k`` as the sampling setting of ``generate()``), or ``layer_heads`` (one
``[num_shared, top_k]`` or ``[num_heads, num_shared, top_k]`` per layer), ``router``, ``backend``,
``qk_norm``. ``router="all"`` is plain multi-head attention (the MHA baseline and converted models).

The short names moh's other families use are aliases (``attribute_map``): ``dim`` =
``hidden_size``, ``depth`` = ``num_hidden_layers``, ``num_heads`` = ``num_attention_heads``,
``max_seq_len`` = ``max_position_embeddings``, ``num_shared`` = ``num_shared_heads``,
``aux_loss_coef`` = ``router_aux_loss_coef``, ...; ``top_k`` = ``top_k_heads`` when building and in
overrides only (as an attribute transformers would take it for generate()'s top-k);
``MoHLMConfig(dim=64)`` and ``cfg.dim`` work, ``config.json`` holds the transformers names.

Aux-loss rule (Mixtral's, with moh's default): when ``output_router_logits`` is true (the
default here; Mixtral's default is false) the forward reports ``aux_loss`` (paper Eq. 7, mean over
layers with a learned router) and the router probabilities, and, when labels are given, adds
``router_aux_loss_coef * aux_loss`` to ``loss``, once. The training engine minimises ``loss`` as
it is, so a moh model trains with its balance term unless ``output_router_logits=False``.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from moh.config import MoHConfig, coerce_value
from moh.models.base import layer_head_layout

# rope types whose frequencies do not depend on the sequence length at run time
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@strict
class MoHLMConfig(PreTrainedConfig):
    """A MoH decoder language model (LLaMA architecture: RMSNorm, RoPE, SwiGLU, grouped-query
    attention; every attention layer a ``moh.MoHAttention``). See the module docstring."""

    model_type = "moh"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map: ClassVar[dict[str, str]] = {
        "dim": "hidden_size", "depth": "num_hidden_layers", "num_heads": "num_attention_heads",
        "num_kv_heads": "num_key_value_heads", "mlp_hidden": "intermediate_size",
        "max_seq_len": "max_position_embeddings", "norm_eps": "rms_norm_eps",
        "tie_embeddings": "tie_word_embeddings", "aux_loss_coef": "router_aux_loss_coef",
        "attn_dropout": "attention_dropout", "num_shared": "num_shared_heads",
    }
    # names accepted when building and in overrides only: never an attribute (transformers would
    # read ``config.top_k`` as generate()'s sampling top-k)
    init_aliases: ClassVar[dict[str, str]] = {"top_k": "top_k_heads"}

    # the LLaMA fields (transformers' names and meanings)
    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None  # None: num_attention_heads (no grouped-query attention)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True
    rope_parameters: RopeParameters | dict | None = None  # None: {"rope_type": "default", "rope_theta": 10000}
    attention_bias: bool = False  # LLaMA: bias on q, k, v and o projections
    attention_out_bias: bool | None = None  # None: = attention_bias; Qwen2: attention_bias=True, this False
    attention_dropout: int | float = 0.0
    mlp_bias: bool = False
    # moh's head specification (moh.models.base.HeadSpec)
    num_shared_heads: int = 0  # alias num_shared
    top_k_heads: int | None = None  # alias top_k; None: every routed head (not "top_k": generation's)
    layer_heads: list | None = None  # per layer [num_shared, top_k] or [num_heads, num_shared, top_k]
    router: str = "two_stage"  # a name in moh.ROUTERS; "all" = multi-head attention
    backend: str = "sparse"  # a name in moh.BACKENDS
    qk_norm: bool = False
    # the Mixtral convention of the balance loss (see the module docstring)
    router_aux_loss_coef: float = 0.01
    output_router_logits: bool = True

    def __post_init__(self, **kwargs):
        aliases = {**self.attribute_map, **self.init_aliases}
        for alias in [k for k in kwargs if k in aliases]:  # MoHLMConfig(dim=64): before deriving
            setattr(self, aliases[alias], kwargs.pop(alias))
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                     "max_position_embeddings"):  # before head_dim is derived (num_attention_heads=0 divides by 0)
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        kwargs = self.convert_rope_params_to_dict(**kwargs)
        super().__post_init__(**kwargs)
        self.check()  # a ValueError naming the value (strict's validators wrap theirs in another type)

    def validate_architecture(self):
        """Part of ``@strict`` validation (``config.validate()``): ``check``."""
        self.check()

    def check(self) -> None:
        """Every layer's ``MoHConfig`` validates itself (heads, top-k, router and backend names),
        then the fields only this class has; a ValueError naming the value."""
        if self.head_dim is None:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                             f"{self.num_attention_heads}; set head_dim explicitly")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r}: moh's decoder uses SwiGLU with silu only")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(f"rope_parameters rope_type={rope_type!r} is not supported; valid choices: "
                             f"{list(STATIC_ROPE_TYPES)}")
        if "partial_rotary_factor" in (self.rope_parameters or {}):
            raise ValueError("rope_parameters partial_rotary_factor is not supported (RoPE on every channel)")
        if not isinstance(self.router_aux_loss_coef, (int, float)) or not self.router_aux_loss_coef >= 0:
            raise ValueError(f"router_aux_loss_coef={self.router_aux_loss_coef!r} must be a number >= 0")
        self.attention_configs()

    # moh ------------------------------------------------------------------------------------
    @property
    def out_bias(self) -> bool:
        return self.attention_bias if self.attention_out_bias is None else self.attention_out_bias

    def attention_configs(self) -> list[MoHConfig]:
        """One ``MoHConfig`` per layer (causal, RoPE; the rope frequencies come from
        ``moh.hf.modeling.rope_frequencies``)."""
        theta = float((self.rope_parameters or {}).get("rope_theta", 10000.0))
        return [
            MoHConfig(dim=self.hidden_size, num_heads=h, num_kv_heads=self.num_key_value_heads, head_dim=self.head_dim,
                      num_shared=s, top_k=k, router=self.router, backend=self.backend, causal=True, rope=True,
                      rope_theta=theta, qk_norm=self.qk_norm, dropout=float(self.attention_dropout),
                      qkv_bias=self.attention_bias, out_bias=self.out_bias)
            for h, s, k in layer_head_layout(self.num_hidden_layers, self.num_attention_heads, self.num_shared_heads,
                                             self.top_k_heads, self.layer_heads)
        ]

    @property
    def active_fraction(self) -> float:
        """Heads each token uses / heads, over all layers."""
        atts = self.attention_configs()
        return sum(a.active_heads for a in atts) / sum(a.num_heads for a in atts)

    @classmethod
    def field_names(cls) -> list[str]:
        """The keys ``with_overrides`` accepts: the fields, then their aliases."""
        own = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
        return own + sorted({**cls.attribute_map, **cls.init_aliases})

    def with_overrides(self, name: str = "", **overrides: Any) -> "MoHLMConfig":
        """A copy with ``overrides`` (field names or their aliases) applied and validated; values
        from YAML are converted to the field's type (``1e-5`` read as a string). An unknown key is
        a ValueError naming it and the valid keys; a bad value is one naming the field."""
        where = f" for model {name!r}" if name else ""
        valid = self.field_names()
        bad = sorted(set(overrides) - set(valid))
        if bad:
            raise ValueError(f"unknown override(s) {bad}{where}; valid keys: {valid}")
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        aliases = {**self.attribute_map, **self.init_aliases}
        given = {aliases.get(k, k): v for k, v in overrides.items()}
        for key, value in given.items():
            data[key] = coerce_value(value, _field_type(type(self), key), key)
        # fields the preset derived are derived again from the new values (unless given)
        if "num_attention_heads" in given and "num_key_value_heads" not in given \
                and self.num_key_value_heads == self.num_attention_heads:
            data["num_key_value_heads"] = None
        if {"num_attention_heads", "hidden_size"} & set(given) and "head_dim" not in given \
                and self.head_dim == self.hidden_size // self.num_attention_heads:
            data["head_dim"] = None
        try:
            return type(self)(**data)
        except (TypeError, ValueError, StrictDataclassError) as e:  # strict's type errors name the field
            raise ValueError(f"model config{where}: {e}") from None

    def build(self):
        """The model (``MoHForCausalLM``) of this config, randomly initialised (through the Auto
        class moh.hf registers: this module does not import the modeling one)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(self)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """As transformers' ``from_dict``, but a config of another model type is a ValueError
        (transformers only warns and builds a moh model from, say, a llama config)."""
        kind = config_dict.get("model_type")
        if kind is not None and kind != cls.model_type:
            raise ValueError(f"the config has model_type={kind!r}, not {cls.model_type!r}: it is not a moh model "
                             f"(convert a pretrained model with moh.hf.from_llama)")
        return super().from_dict(config_dict, **kwargs)


def _field_type(cls: type, name: str) -> Any:
    """The annotation of field ``name`` evaluated in its class's module (Any when it does not
    evaluate: ``typing.get_type_hints`` fails on transformers' base config)."""
    for klass in cls.__mro__:
        ann = klass.__dict__.get("__annotations__", {})
        if name in ann:
            tp = ann[name]
            if isinstance(tp, str):
                try:
                    tp = eval(tp, vars(sys.modules[klass.__module__]))  # noqa: S307 (our own annotations)
                except Exception:  # noqa: BLE001
                    return Any
            return tp
    return Any


__all__ = ["MoHLMConfig", "STATIC_ROPE_TYPES"]
