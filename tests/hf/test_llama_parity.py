"""A moh model built from a LlamaConfig and loaded with a LlamaForCausalLM's weights (router
``all``) computes what LlamaForCausalLM computes: logits within 1e-4, the same greedy tokens.
Tiny random LLaMAs: grouped-query attention, scaled RoPE, tied and untied embeddings, biases."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moh.hf import MoHForCausalLM, convert_llama_state_dict, from_llama, llama_config_to_moh, llama_key_to_moh

ROPE = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0},
    "default": {"rope_type": "default", "rope_theta": 10000.0},
}


def tiny_llama(tie=True, rope="llama3", bias=False, kv_heads=2, head_dim=None, seed=0):
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=128,
                      tie_word_embeddings=tie, attention_bias=bias, rms_norm_eps=1e-5, rope_parameters=dict(ROPE[rope]))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    if bias:  # LLaMA initialises biases to zero: make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("tie,rope,bias,head_dim", [(True, "llama3", False, None), (False, "llama3", False, None),
                                                    (False, "yarn", True, None), (True, "linear", False, 12),
                                                    (True, "default", False, None)])
def test_logits_equal_llama(tie, rope, bias, head_dim):
    llama = tiny_llama(tie=tie, rope=rope, bias=bias, head_dim=head_dim)
    moh_model, report = from_llama(llama)
    assert report.new == [] and moh_model.config.router == "all"
    assert (moh_model.lm_head.weight is moh_model.model.embed_tokens.weight) == tie
    ids = torch.randint(0, 96, (2, 100), generator=torch.Generator().manual_seed(1))  # past the rope's original length
    with torch.no_grad():
        want, got = llama(ids).logits, moh_model(ids).logits
    assert want.abs().max() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_greedy_generation_equals_llama():
    llama = tiny_llama()
    moh_model, _ = from_llama(llama)
    prompt = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(moh_model.generate(prompt, **kw), llama.generate(prompt, **kw))


def test_config_carries_every_llama_field():
    llama = tiny_llama(tie=False, bias=True, kv_heads=3, head_dim=10)
    cfg = llama_config_to_moh(llama.config, router="query_norm", num_shared=2, top_k=2)
    for name in ("num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "attention_bias",
                 "max_position_embeddings", "vocab_size", "intermediate_size"):
        assert getattr(cfg, name) == getattr(llama.config, name), name
    assert cfg.rope_parameters == llama.config.rope_parameters
    assert cfg.attention_configs()[0].qkv_bias and cfg.attention_configs()[0].out_bias
    assert (cfg.router, cfg.num_shared_heads, cfg.top_k_heads, cfg.active_fraction) == ("query_norm", 2, 2, 4 / 6)


def test_state_dict_names_map_and_unknown_names_are_refused():
    sd = convert_llama_state_dict(tiny_llama(tie=False).state_dict())
    assert set(sd) == set(MoHForCausalLM(llama_config_to_moh(tiny_llama(tie=False).config)).state_dict())
    assert llama_key_to_moh("model.layers.3.input_layernorm.weight") == "model.layers.3.norm1.weight"
    assert llama_key_to_moh("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(ValueError, match="model.layers.0.block_sparse_moe.gate.weight"):
        llama_key_to_moh("model.layers.0.block_sparse_moe.gate.weight")


def test_learned_router_parameters_are_reported_new():
    moh_model, report = from_llama(tiny_llama(), router="two_stage", num_shared=2, top_k=2)
    assert report.new and all(".attn.router." in k for k in report.new)
    assert len(report.copied) + len(report.new) == len(moh_model.state_dict()) - 0  # tied lm_head counted in copied
