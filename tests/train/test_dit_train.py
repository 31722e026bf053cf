"""A MoH-DiT through the one engine: the denoising loss falls, and resume is bit-exact, EMA included."""
import json
import shutil

import torch
from safetensors.torch import load_file

from moh.data import build_dataset
from moh.models import create_model
from moh.train.engine import evaluate, fit

DIT = ["model.name=moh-dit-tiny-90",
       "model.overrides={dim: 32, depth: 2, num_heads: 4, layer_heads: [[1, 2], [4, 0]], image_size: 8, "
       "patch_size: 2, num_classes: 4, ema_decay: 0.9}",
       "data.args={size: 64, image_size: 8, num_classes: 4}"]


def _fixed_loss(model, data) -> float:
    torch.manual_seed(123)  # the same timesteps and noise for both evaluations
    return evaluate(model, data)["loss"]


def test_training_lowers_the_denoising_loss(smoke_cfg):
    cfg = smoke_cfg(*DIT, "train.steps=25", "train.batch_size=32", "optim.lr=3e-3", "optim.warmup_steps=2",
                    "train.save_every=0", "train.log_every=5")
    data = build_dataset("random-images", "train", **cfg.data.args)
    torch.manual_seed(cfg.train.seed)
    before = _fixed_loss(create_model(cfg.model.name, **cfg.model.overrides), data)
    result = fit(cfg, eval_data=data)
    after = _fixed_loss(result.model, data)
    assert after < before - 0.2, (before, after)  # from 1.0 (zero-initialised output)
    assert "mse_t750-999" in result.history[-1] and result.history[-1]["heads_active"] < 1
    assert int(result.model.ema.num_updates) == 25


def test_resume_is_bit_exact_including_the_ema(smoke_cfg, tmp_path):
    common = [*DIT, "train.steps=8", "train.batch_size=16", "train.save_every=4", "train.keep_last=0",
              "train.metrics_csv=false"]
    ref = fit(smoke_cfg(*common, f"train.out_dir={tmp_path / 'ref'}"))
    cut_dir = tmp_path / "cut"
    fit(smoke_cfg(*common, f"train.out_dir={cut_dir}"))
    shutil.rmtree(cut_dir / "checkpoints" / "step_00000008")  # back to the state after step 4
    (cut_dir / "model.safetensors").unlink()
    resumed = fit(smoke_cfg(*common, f"train.out_dir={cut_dir}", "train.resume=true"))
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(cut_dir / "model.safetensors"))
    assert a.keys() == b.keys() and sum(k.startswith("ema.") for k in a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert int(a["ema.num_updates"]) == 8
    assert not torch.equal(a["ema.blocks__0__attn__q_proj__weight"], a["blocks.0.attn.q_proj.weight"])
    assert resumed.history[-1]["loss"] == ref.history[-1]["loss"]
    assert json.loads((cut_dir / "final.json").read_text())["resumed_from"] == 4
