"""MoH decoder language models: the presets. The model itself is moh's transformers model,
``moh.hf.MoHForCausalLM`` (config ``moh.hf.MoHLMConfig``): one decoder body, LLaMA-style (RMSNorm,
RoPE, SwiGLU, grouped-query attention), every attention layer a ``MoHAttention``; generation is
transformers' ``generate()``. ``create_model("moh-llm-tiny-50", dim=64)`` returns one (overrides by
field name or alias, validated).

Families (the MHA baseline of each is the same model with router ``all``):

* ``*-tiny-*`` (tests, CPU runs) and ``*-demo-*`` (``moh demo``'s in-context recall), 8 heads;
* ``*-mini-*``: the from-scratch English comparison of docs/results/llm.md (sized to run 6 times
  in about two hours on 2 CPU cores);
* LLM-S / LLM-B (the paper's sizes): 12 layers x 768, 12 heads, FFN 2048 / 24 layers x 1536,
  16 heads, FFN 4096. The paper gives 186M / 881M parameters; an untied vocabulary of 65,536
  (2^16: ids fit uint16 token files) gives 185.6M / 880.8M (a tied one of 131,072 gives the same
  counts). 75% / 50% of heads: a quarter of the heads shared, the top half / quarter of the others
  routed (S: 3 shared + top-6 / top-3 of 9; B: 4 shared + top-8 / top-4 of 12).
"""
from __future__ import annotations

from moh.hf.configuration import MoHLMConfig
from moh.models.factory import MODELS


def _register(name: str, **fields) -> None:
    MODELS.register(name)(lambda: MoHLMConfig(**fields))


def _family(prefix: str, mha: dict | None = None, moh75: dict | None = None, moh50: dict | None = None,
            **shape) -> None:
    """``{prefix}-mha``, ``moh-{prefix}-75``, ``moh-{prefix}-50``: one shape, three head settings."""
    _register(f"{prefix}-mha", router="all", **shape)
    _register(f"moh-{prefix}-75", **moh75, **shape)
    _register(f"moh-{prefix}-50", **moh50, **shape)


# tiny decoders (tests): 8 heads of width 16; 75% = 2 shared + top-4 of 6, 50% = 2 + top-2
_TINY = dict(vocab_size=256, max_position_embeddings=512, hidden_size=128, num_hidden_layers=4,
             num_attention_heads=8, intermediate_size=352)
_family("llm-tiny", moh75=dict(num_shared_heads=2, top_k_heads=4), moh50=dict(num_shared_heads=2, top_k_heads=2),
        **_TINY)

# the demo's decoders (moh demo, in-context recall): 2 layers are the fewest that can learn MQAR
# (an induction circuit); 8 heads of width 16
_DEMO = dict(vocab_size=64, max_position_embeddings=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
             head_dim=16, intermediate_size=192)
_family("llm-demo", moh75=dict(num_shared_heads=2, top_k_heads=4), moh50=dict(num_shared_heads=2, top_k_heads=2),
        **_DEMO)

# the from-scratch English comparison (docs/results/llm.md): vocabulary of the 8k BPE trained by
# `moh data tokenizer`, 128-token context
_MINI = dict(vocab_size=8192, max_position_embeddings=128, hidden_size=128, num_hidden_layers=4,
             num_attention_heads=8, intermediate_size=352)
_family("llm-mini", moh75=dict(num_shared_heads=2, top_k_heads=4), moh50=dict(num_shared_heads=2, top_k_heads=2),
        **_MINI)

# the paper's LLM-S and LLM-B
_S = dict(vocab_size=65536, tie_word_embeddings=False, max_position_embeddings=4096, hidden_size=768,
          num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048)
_family("llm-s", moh75=dict(num_shared_heads=3, top_k_heads=6), moh50=dict(num_shared_heads=3, top_k_heads=3), **_S)
_B = dict(vocab_size=65536, tie_word_embeddings=False, max_position_embeddings=4096, hidden_size=1536,
          num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
_family("llm-b", moh75=dict(num_shared_heads=4, top_k_heads=8), moh50=dict(num_shared_heads=4, top_k_heads=4), **_B)
