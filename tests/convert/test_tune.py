"""moh train starts from a converted model directory (model.name: hf:DIR), with LoRA (PEFT) or
only chosen parameters trainable; load_run rebuilds the same model; resume is exact."""
import pytest
import torch

from moh.train import fit
from moh.train.config import RunConfig
from moh.train.engine import load_run

from tests.convert.test_convert import tiny

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from moh.convert import convert
    tmp = tmp_path_factory.mktemp("converted")
    _, path = tiny("llama", tmp)
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    return convert(str(path), heads="67%", router="calibrated", calib_ids=ids).save(tmp / "moh")


@pytest.fixture(scope="module")
def lora_run(converted, tmp_path_factory):
    """One 2-step LoRA run from the converted model (adapters on q, o and the MLP's down projection)."""
    tmp = tmp_path_factory.mktemp("lora")
    return fit(run_cfg(tmp, converted, steps=2, lora={"r": 4, "targets": ["q_proj", "o_proj", "down_proj"]}))


def run_cfg(tmp_path, model_dir, steps=3, **model):
    return RunConfig.from_dict({
        "model": {"name": f"hf:{model_dir}", **model},
        "data": {"name": "mqar", "args": {"num_examples": 32, "seq_len": 32, "num_kv_pairs": 4, "vocab_size": 64}},
        "optim": {"lr": 1e-2, "warmup_steps": 0},
        "train": {"steps": steps, "batch_size": 4, "log_every": 1, "save_every": 2, "out_dir": str(tmp_path / "run"),
                  "progress": False, "tensorboard": False, "metrics_csv": False},
    })


def test_lora_trains_adapters_only_and_reloads(converted, lora_run):
    from moh.hf import MoHForCausalLM
    base = MoHForCausalLM.from_pretrained(converted)
    result = lora_run
    model = result.model
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert any(float(p.detach().abs().max()) > 0 for n, p in lora.items() if "lora_B" in n)  # adapters moved
    frozen = dict(base.named_parameters())
    w = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in model.named_parameters()}
    assert torch.equal(w["model.embed_tokens.weight"], frozen["model.embed_tokens.weight"])
    assert torch.equal(w["model.layers.0.attn.router.score.weight"], frozen["model.layers.0.attn.router.score.weight"])
    again, _ = load_run(result.out_dir)
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, result.model.eval()(input_ids=x).logits)


def test_trainable_patterns_and_resume(tmp_path, converted):
    cfg = run_cfg(tmp_path, converted, steps=2, trainable=["*.mlp.*", "model.norm.*"])
    cfg.train.save_every = 1
    full = fit(cfg).model
    assert {n for n, p in full.named_parameters() if p.requires_grad} == \
        {n for n, _ in full.named_parameters() if ".mlp." in n or n.startswith("model.norm.")}
    # stopped after the step-1 checkpoint, resumed: the weights of the run without a stop
    import shutil
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "run", stopped)
    for name in ("final.json", "model.safetensors"):
        (stopped / name).unlink()
    shutil.rmtree(stopped / "checkpoints" / "step_00000002")
    cfg.train.out_dir, cfg.train.resume = str(stopped), True
    resumed = fit(cfg).model
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


def test_bad_specs_are_errors_naming_the_key(tmp_path, converted):
    with pytest.raises(ValueError, match="model.lora.rank"):
        run_cfg(tmp_path, converted, lora={"rank": 4})
    with pytest.raises(ValueError, match="matches no parameter"):
        fit(run_cfg(tmp_path, converted, trainable=["nothing.*"]))
    with pytest.raises(ValueError, match="not a saved moh model directory"):
        fit(run_cfg(tmp_path, tmp_path / "missing"))


def test_a_tuned_run_converts_again_and_is_written_as_it_is(tmp_path, lora_run):
    """Stage 1 -> stage 2: a finished run (LoRA merged) is a conversion source; router keep writes
    the tuned model as a plain moh model directory with the run's function."""
    from transformers import AutoModelForCausalLM

    from moh.convert import convert
    result = lora_run
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        want = result.model.eval()(input_ids=x).logits
    out = convert(str(result.out_dir), router="keep").save(tmp_path / "kept")
    kept = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(kept(input_ids=x).logits, want, atol=1e-5, rtol=0)
    again = convert(str(result.out_dir), heads="100%")  # re-split: every head, router all
    assert again.report["source"]["kind"] == "run" and again.report["check"]["max_abs_logit_diff_every_head"] is None
    assert again.report["check"]["max_abs_logit_diff_reordered"] < 1e-4
