"""moh's language models as native Hugging Face transformers models.

``MoHLMConfig`` (``model_type="moh"``), ``MoHModel`` and ``MoHForCausalLM`` are registered with
``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` when ``moh`` is imported, so
``AutoModelForCausalLM.from_pretrained(run_or_model_dir)`` loads a moh model without
``trust_remote_code``. ``from_llama`` / ``convert_llama_state_dict`` / ``llama_config_to_moh``
turn a LLaMA model (transformers' ``LlamaForCausalLM``) into a moh model with the same function.

    >>> import moh
    >>> from moh.hf import MoHLMConfig, MoHForCausalLM
    >>> cfg = MoHLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_shared=1, top_k=1)  # 2 of 4 heads per token
    >>> model = MoHForCausalLM(cfg)
    >>> out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)  # doctest: +SKIP
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from moh.hf.cache import LayerCache
from moh.hf.configuration import MoHLMConfig
from moh.hf.convert import convert_llama_state_dict, from_llama, llama_config_to_moh, llama_key_to_moh
from moh.hf.modeling import MoHCausalLMOutput, MoHForCausalLM, MoHModel, MoHModelOutput, MoHPreTrainedModel


def register() -> None:
    """Register the classes with transformers' Auto classes (idempotent)."""
    AutoConfig.register(MoHLMConfig.model_type, MoHLMConfig, exist_ok=True)
    AutoModel.register(MoHLMConfig, MoHModel, exist_ok=True)
    AutoModelForCausalLM.register(MoHLMConfig, MoHForCausalLM, exist_ok=True)


register()

__all__ = ["MoHLMConfig", "MoHModel", "MoHForCausalLM", "MoHPreTrainedModel", "MoHCausalLMOutput", "MoHModelOutput",
           "LayerCache", "from_llama", "convert_llama_state_dict", "llama_config_to_moh", "llama_key_to_moh",
           "register"]
