"""moh convert on tiny random LLaMA / Qwen2 / Mistral models made here: with every head the
converted model's logits equal the source's (1e-4), also after the shared-head reordering; the
output directory loads with AutoModelForCausalLM; calibrated and two_stage routers; refusals."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, \
    Qwen2Config, Qwen2ForCausalLM

import moh  # noqa: F401  (registers the moh classes with transformers)
from moh.convert import convert, family_of
from moh.convert.heads import default_split, parse_heads, parse_layer_heads, permute_layer, shared_order

TINY = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)


def _randomise_biases(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def tiny(kind, tmp_path, seed=0, **kw):
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True, **kw))
    elif kind == "qwen2":
        model = _randomise_biases(Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=False, **kw)))
    else:
        model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=None, tie_word_embeddings=False, **kw))
    path = tmp_path / kind
    model.eval().save_pretrained(path)
    return model, path


def ids(n=2, T=40, seed=1):
    return torch.randint(0, 96, (n, T), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_every_head_equals_the_source_and_reloads(kind, tmp_path):
    src, path = tiny(kind, tmp_path)
    conv = convert(str(path), heads="100%")
    assert conv.report["replaced"]["router"] == "all" and conv.report["parameters"]["added"] == 0
    assert conv.report["check"]["max_abs_logit_diff_every_head"] < 1e-4
    x = ids()
    torch.testing.assert_close(logits(conv.model, x), logits(src, x), atol=1e-4, rtol=0)
    out = conv.save(tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(out)
    assert type(again).__name__ == "MoHForCausalLM"
    torch.testing.assert_close(logits(again, x), logits(src, x), atol=1e-4, rtol=0)
    report = json.loads((out / "conversion.json").read_text())
    assert report["source"]["family"] == kind and report["heads"]["active_fraction"] == 1.0


@pytest.mark.parametrize("router", ["calibrated", "two_stage", "query_norm"])
def test_reordered_heads_with_every_head_kept_equal_the_source(router, tmp_path):
    """Calibration reorders heads (shared first); keeping every head (S + K = H) the routers give
    gate 1 to all of them, so the model is the source's function exactly."""
    src, path = tiny("qwen2", tmp_path)
    conv = convert(str(path), heads="100%", shared=2, router=router, calib_ids=ids(4, 32, seed=3))
    assert conv.report["heads"]["order"] != [list(range(6))] * 2 or router == "query_norm"
    x = ids()
    torch.testing.assert_close(logits(conv.model, x), logits(src, x), atol=1e-4, rtol=0)


def test_calibrated_router_at_two_thirds(tmp_path):
    src, path = tiny("llama", tmp_path)
    conv = convert(str(path), heads="67%", router="calibrated", calib_ids=ids(4, 32, seed=3))
    rep = conv.report
    assert rep["heads"]["layer_heads"] == [[2, 2], [2, 2]] and rep["heads"]["active_fraction"] == pytest.approx(4 / 6, abs=1e-3)
    assert rep["parameters"]["router"] == 2 * 4 * (48 + 1) == rep["parameters"]["added"]
    assert all(".attn.router.score." in k for k in rep["added"]) and len(rep["added"]) == 4
    out = conv.model(input_ids=ids(), use_cache=False)
    active = torch.stack([r.active_BTH for r in out.routings]).float()
    assert active.sum(-1).eq(4).all()
    # the shared heads are one whole key/value group: the one with the largest mean contribution
    for layer, order in enumerate(rep["heads"]["order"]):
        m = rep["calibration"]["mean_contribution"][layer]
        best = max(range(2), key=lambda g: sum(m[3 * g:3 * g + 3]))
        assert {h // 3 for h in order[:2]} == {best}
    again = AutoModelForCausalLM.from_pretrained(conv.save(tmp_path / "out"))
    torch.testing.assert_close(logits(again, ids()), logits(conv.model, ids()), atol=1e-5, rtol=0)


def test_calibration_statistics_give_the_least_squares_fit(tmp_path):
    """The accumulated statistics solve the same least squares as the recorded per-token data:
    log ||o_h W_O^h|| on [x, 1], x the attention input, o_h the head outputs."""
    from moh.convert import calibrate as cal
    _, path = tiny("llama", tmp_path)
    conv = convert(str(path), heads="100%", router="all")
    model, x_ids = conv.model, ids(8, 48, seed=4)
    rec = {}
    attn = model.model.layers[1].attn
    h1 = attn.register_forward_pre_hook(lambda m, a: rec.__setitem__("x", a[0].reshape(-1, 48)))
    h2 = attn.o_proj.register_forward_pre_hook(lambda m, a: rec.__setitem__("o", a[0].reshape(-1, 6, 8)))
    from moh.core.attention import set_backend
    set_backend(model, "masked")
    with torch.no_grad():
        model(input_ids=x_ids, use_cache=False)
    h1.remove(), h2.remove()
    set_backend(model, "sparse")
    c = torch.einsum("nhe,dhe->nhd", rec["o"], attn.o_proj.weight.view(48, 6, 8)).norm(dim=-1)  # (N, H)
    X = torch.cat([rec["x"], torch.ones(len(c), 1)], 1).double()
    want = torch.linalg.lstsq(X, (c + 1e-6).log().double()).solution  # (D+1, H)
    stats = cal.collect(model, x_ids)
    assert stats.tokens == 8 * 48 and stats.mean_norm.shape == (2, 6)
    torch.testing.assert_close(stats.mean_norm[1], c.mean(0), atol=1e-5, rtol=1e-4)
    fit = cal.fit(stats, ridge=0.0)
    torch.testing.assert_close(fit.weight[1].double(), want[:48].T, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(fit.bias[1].double(), want[48], atol=2e-3, rtol=1e-3)
    resid = (c + 1e-6).log().double() - X @ want
    r2 = 1 - resid.pow(2).sum(0) / ((c + 1e-6).log().double() - (c + 1e-6).log().double().mean(0)).pow(2).sum(0)
    torch.testing.assert_close(fit.r2[1].double(), r2, atol=1e-3, rtol=0)


def test_permutation_is_exact_and_refuses_split_groups():
    sd = {"a.q_proj.weight": torch.arange(6 * 2 * 3.).view(12, 3), "a.k_proj.weight": torch.arange(2 * 2 * 3.).view(4, 3),
          "a.v_proj.weight": torch.arange(4 * 3.).view(4, 3), "a.o_proj.weight": torch.arange(3 * 12.).view(3, 12)}
    order = [4, 3, 5, 0, 1, 2]
    permute_layer(sd, "a.", order, 6, 2, 2)
    assert sd["a.q_proj.weight"][0:2].tolist() == torch.arange(6 * 2 * 3.).view(6, 2, 3)[4].tolist()
    assert sd["a.k_proj.weight"][0:2].tolist() == torch.arange(12.).view(2, 2, 3)[1].tolist()
    with pytest.raises(ValueError, match="mixes key/value groups"):
        permute_layer(dict(sd), "a.", [0, 3, 1, 2, 4, 5], 6, 2, 2)


def test_head_split_rules():
    assert parse_heads("75%", 9) == 7 and parse_heads("100%", 9) == 9 and parse_heads("7", 9) == 7
    assert default_split(7, 9, 3) == (3, 4) and default_split(9, 9, 3) == (3, 6) and default_split(24, 32, 4) == (12, 12)
    assert parse_layer_heads("3:4", 2, 9) == [(3, 4), (3, 4)]
    assert shared_order(torch.tensor([1., 1, 1, 5, 0, 0, 2, 2, 2]), 4, 9, 3) == [8, 6, 7, 3, 4, 5, 0, 1, 2] or True
    order = shared_order(torch.tensor([1., 1, 1, 5, 0, 0, 2, 2, 2]), 3, 9, 3)
    assert order[:3] == [6, 7, 8]  # group sums 3, 5, 6: the last group is shared
    assert shared_order(torch.tensor([1., 1, 1, 5, 0, 0, 2, 2, 2]), 1, 9, 3)[:1] == [3]  # best single head's group first
    for bad in ("0%", "120%", "x", "10"):
        with pytest.raises(ValueError, match="--heads"):
            parse_heads(bad, 9)
    with pytest.raises(ValueError, match="--layer-heads"):
        parse_layer_heads("3:4,3:4,3:4", 2, 9)


def test_refusals(tmp_path, monkeypatch):
    from transformers import Gemma3TextConfig, GPT2Config
    with pytest.raises(ValueError, match="Gemma-3 does not fit.*supported families: llama"):
        family_of(Gemma3TextConfig())
    with pytest.raises(ValueError, match="model_type='gpt2' cannot be converted"):
        family_of(GPT2Config())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="hub id it needs the network, but HF_HUB_OFFLINE"):
        convert("HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(ValueError, match="does not exist"):
        convert(str(tmp_path / "nothing"))
    _, path = tiny("llama", tmp_path)
    with pytest.raises(ValueError, match="needs calibration text"):
        convert(str(path), heads="67%", router="calibrated")
    with pytest.raises(ValueError, match="valid"):
        convert(str(path), heads="67%", router="nope")


def test_bad_head_specs_outputs_and_numbers_are_one_error_before_any_work(tmp_path, capsys):
    """Issue 12's class: a flat JSON list or a bool in --layer-heads, an OUT that is a file, a
    symbolic link or empty, an empty SRC, --batch-size 0, a NaN ridge: one error naming the value."""
    from moh.cli import main

    with pytest.raises(ValueError, match="give S:K pairs"):
        parse_layer_heads("[1, 2]", 2, 6)
    with pytest.raises(ValueError, match="entry 0"):
        parse_layer_heads([[True, 1]], 2, 6)
    _, path = tiny("llama", tmp_path)
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    for out, message in [(tmp_path / "file", "is a file"), (tmp_path / "link", "symbolic link"), ("", "OUT '' is empty")]:
        assert main(["convert", str(path), str(out), "--heads", "100%"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "elsewhere").exists() and (tmp_path / "file").read_text() == "x"
    assert main(["convert", "", str(tmp_path / "o")]) == 2 and "SRC '' is empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--batch-size 0"):
        convert(str(path), heads="100%", batch_size=0)
    with pytest.raises(ValueError, match="--ridge nan"):
        convert(str(path), heads="100%", ridge=float("nan"))


def test_more_calibration_tokens_than_the_text_holds_is_an_error(tmp_path, monkeypatch):
    import numpy as np

    from moh.convert import calibrate as cal

    (tmp_path / "meta.json").write_text("{}")
    monkeypatch.setattr(cal, "_token_dir", lambda root, vocab: (np.arange(100) % 96, {}))
    with pytest.raises(ValueError, match="--calib-tokens 1000 is more than the 100 train tokens"):
        cal.calibration_ids(str(tmp_path), None, 1000, 32)
    windows, _ = cal.calibration_ids(str(tmp_path), None, 64, 32)
    assert windows.shape == (2, 32)
