"""MoHForCausalLM as a transformers model: Auto classes, save/load round trip (strict), the
aux-loss rule (never twice), overrides by name, the context limit."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig

import moh  # noqa: F401  (registers the Auto classes)
from moh.hf import MoHForCausalLM, MoHLMConfig, MoHModel
from moh.models import create_model, model_config

from .conftest import tiny_config

IDS = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))


def test_auto_classes_and_round_trip_in_safetensors(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "moh"
    assert "top_k" not in json.loads((tmp_path / "config.json").read_text())  # generate()'s, not ours
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MoHLMConfig)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is MoHForCausalLM and again.lm_head.weight is again.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, model(IDS).logits, atol=0, rtol=0)
    assert type(AutoModel.from_pretrained(tmp_path)) is MoHModel


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_weights_that_do_not_fit_are_an_error_not_random_init(model, tmp_path, damage):
    model.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.1.attn.k_proj.weight"
    if damage == "missing":
        del sd[name]
    elif damage == "unexpected":
        sd["model.layers.1.attn.extra.weight"] = torch.zeros(3)
        name = "model.layers.1.attn.extra.weight"
    else:
        sd[name] = torch.zeros(7, 32)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        MoHForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_damaged_file_and_foreign_config_are_clear_errors(model, tmp_path):
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors"):
        MoHForCausalLM.from_pretrained(tmp_path)
    LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type='llama'"):
        MoHForCausalLM.from_pretrained(tmp_path)


def test_loss_adds_the_balance_term_once(model):
    out = model(IDS, labels=IDS)
    coef = model.config.router_aux_loss_coef
    assert out.aux_loss > 0 and len(out.router_logits) == 2 and out.router_logits[0].shape == (2, 12, 3)
    assert torch.equal(out.loss, out.task_loss + coef * out.aux_loss)  # exactly one coef * aux
    plain = model(IDS, labels=IDS, output_router_logits=False)
    assert torch.equal(plain.loss, plain.task_loss) and plain.aux_loss is None and plain.router_logits is None
    torch.testing.assert_close(plain.task_loss, out.task_loss)
    mha = MoHForCausalLM(tiny_config(router="all"))(IDS, labels=IDS)
    assert mha.aux_loss == 0 and torch.equal(mha.loss, mha.task_loss)
    assert set(out.metrics) == {"acc", "task_loss", "aux_loss", "heads_active"}
    assert out.metrics["heads_active"][0] / out.metrics["heads_active"][1] == pytest.approx(0.5)


def test_engine_minimises_the_models_loss_as_is(tmp_path):
    """The logged training loss is task + coef * aux: the engine adds nothing of its own."""
    from moh.train.config import RunConfig
    from moh.train.engine import fit

    cfg = RunConfig.load(None, [
        "model.name=moh-llm-tiny-50", "model.overrides={vocab_size: 32, dim: 32, depth: 1, num_heads: 4, num_shared: 1, top_k: 1, "
        "intermediate_size: 64, aux_loss_coef: 0.5}",
        "data.name=mqar", "data.args={num_examples: 16, seq_len: 16, num_kv_pairs: 2, vocab_size: 32}",
        "train.steps=1", "train.batch_size=8", "train.log_every=1", "optim.warmup_steps=0", "train.progress=false",
        "train.tensorboard=false", f"train.out_dir={tmp_path / 'run'}"])
    rec = fit(cfg).history[0]
    assert rec["aux_loss"] > 0.5
    assert rec["loss"] == pytest.approx(rec["task_loss"] + 0.5 * rec["aux_loss"], rel=1e-6)


def test_presets_overrides_by_name_and_alias():
    cfg = model_config("moh-llm-tiny-50", dim=64, depth=1, num_heads=4, top_k=1, aux_loss_coef=0.1)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.top_k_heads) == (64, 1, 4, 1)
    assert cfg.head_dim == 16 and cfg.num_key_value_heads == 4  # derived again from the new width and heads
    assert cfg.router_aux_loss_coef == 0.1 and cfg.dim == 64
    assert model_config("moh-llm-tiny-50", rms_norm_eps="1e-5").rms_norm_eps == 1e-5  # YAML reads 1e-5 as text
    with pytest.raises(ValueError, match=r"\['bogus'\].*moh-llm-tiny-50"):
        model_config("moh-llm-tiny-50", bogus=1)
    with pytest.raises(ValueError, match="top_k=9"):
        model_config("moh-llm-tiny-50", top_k=9)
    with pytest.raises(ValueError, match="hidden_act"):
        model_config("moh-llm-tiny-50", hidden_act="gelu")
    with pytest.raises(ValueError, match="dynamic"):
        model_config("moh-llm-tiny-50", rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    assert type(create_model("llm-tiny-mha", depth=1)) is MoHForCausalLM


def test_paper_sizes_count_186m_and_881m_parameters():
    """LLM-S / LLM-B (untied 65,536 vocabulary), counted from the shapes without building them."""
    for name, want in (("llm-s-mha", 185.6e6), ("llm-b-mha", 880.8e6)):
        c = model_config(name)
        D, F, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
        per_layer = 4 * D * D + 3 * D * F + 2 * D
        total = L * per_layer + 2 * V * D + D
        assert total == pytest.approx(want, rel=1e-3), name
    small = create_model("llm-s-mha", depth=1, vocab_size=64)  # one layer built: the formula is the model's count
    D = small.config.hidden_size
    assert sum(p.numel() for p in small.parameters()) == 4 * D * D + 3 * D * 2048 + 2 * D + 2 * 64 * D + D


def test_context_and_unsupported_requests_are_value_errors(model):
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="output_attentions"):
        model(IDS, output_attentions=True)
    with pytest.raises(ValueError, match="tuple caches"):
        model(IDS, past_key_values=((torch.zeros(1), torch.zeros(1)),))
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(IDS, labels=IDS, logits_to_keep=1)
    out = model(IDS, logits_to_keep=1, output_hidden_states=True)
    assert out.logits.shape == (2, 1, 61) and len(out.hidden_states) == 3


def test_per_layer_head_splits_build_run_and_reload(tmp_path):
    cfg = tiny_config(head_dim=8, layer_heads=[[1, 1], [6, 2, 2]])  # layer 1: 6 heads, 2 shared + top-2 of 4
    model = MoHForCausalLM(cfg).eval()
    assert model.model.layers[1].attn.q_proj.weight.shape == (48, 32) and cfg.active_fraction == pytest.approx(0.6)
    out = model(IDS)
    assert [r.active_BTH.float().mean().item() for r in out.routings] == [0.5, pytest.approx(4 / 6)]
    model.save_pretrained(tmp_path)
    again = MoHForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.layer_heads == [[1, 1], [6, 2, 2]]
    torch.testing.assert_close(again(IDS).logits, out.logits, atol=0, rtol=0)


def test_config_sizes_and_token_ids_out_of_range_are_named(model):
    """Issue 12's class: zero sizes (num_attention_heads=0 divided by zero), ids past the
    vocabulary, negative or float ids: a ValueError naming the value, not an IndexError."""
    for kw, message in [(dict(num_attention_heads=0), "num_attention_heads=0"), (dict(vocab_size=0), "vocab_size=0"),
                        (dict(max_position_embeddings=0), "max_position_embeddings=0")]:
        with pytest.raises(ValueError, match=message):
            tiny_config(**kw)
    with pytest.raises(ValueError, match="input_ids run from 0 to 61"):
        model(input_ids=torch.tensor([[0, 61]]))
    with pytest.raises(ValueError, match="input_ids run from -1"):
        model(input_ids=torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="integer token ids"):
        model(input_ids=torch.tensor([[1.0, 2.0]]))
    assert model(input_ids=torch.tensor([[0, 60]])).logits.shape == (1, 2, 61)


def test_from_pretrained_names_a_path_that_is_no_model_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: {name: moh-dit-tiny-90}\n")  # a run without config.json
    for path, message in [(tmp_path / "nope", "no such directory"), (tmp_path / "f", "it is a file"),
                          (tmp_path / "run", "no config.json")]:
        with pytest.raises(ValueError, match=message):
            MoHForCausalLM.from_pretrained(path)


def test_labels_outside_the_vocabulary_are_named(model):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="labels run from 1 to 999"):
        model(input_ids=ids, labels=torch.tensor([[1, 2, 999]]))
    assert torch.isfinite(model(input_ids=ids, labels=torch.tensor([[1, -100, 3]])).loss)


def test_masks_generate_settings_and_save_paths_outside_their_domain_are_named(model, tmp_path):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        model(input_ids=ids, attention_mask=torch.tensor([[1, 2, 1]]))
    for kw, message in [(dict(num_beams=0), "num_beams=0"), (dict(top_p=1.5, do_sample=True), "top_p=1.5"),
                        (dict(temperature=float("nan"), do_sample=True), "temperature=nan")]:
        with pytest.raises(ValueError, match=message):
            model.generate(ids, max_new_tokens=1, **kw)
    assert model.generate(ids, max_new_tokens=1, do_sample=False).shape == (1, 4)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="it is a file"):
        model.save_pretrained(tmp_path / "f")
