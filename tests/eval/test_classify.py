"""``moh eval`` and ``moh analyze`` on a tiny run directory (random images, no training needed)."""
import json

import pytest
import torch

from moh.cli import main as moh_main
from moh.data import build_dataset
from moh.eval.classify import throughput
from moh.models import create_model
from moh.train import checkpoint as ckpt
from moh.train.config import DataSpec, LoopConfig, ModelSpec, RunConfig

TINY = {"depth": 2, "dim": 32, "num_heads": 4, "num_shared": 1, "top_k": 2, "image_size": 8, "num_classes": 4}


@pytest.fixture
def run_dir(tmp_path):
    """What a finished ``moh train`` leaves behind: config.yaml + model.safetensors."""
    cfg = RunConfig(model=ModelSpec("moh-vit-tiny-50", dict(TINY)),
                    data=DataSpec("random-images", {"size": 40, "image_size": 8, "num_classes": 4}),
                    train=LoopConfig(out_dir=str(tmp_path)))
    torch.manual_seed(0)
    cfg.save(tmp_path / "config.yaml")
    ckpt.save_weights(create_model("moh-vit-tiny-50", **TINY), tmp_path / "model.safetensors")
    return tmp_path


def _hand_accuracy(split="test"):
    torch.manual_seed(0)
    model = create_model("moh-vit-tiny-50", **TINY).eval()
    data = build_dataset("random-images", split, size=40, image_size=8, num_classes=4)
    with torch.no_grad():
        logits = model(images=data.images).logits
    return (logits.argmax(-1) == data.labels).float().mean().item()


def test_eval_writes_json_with_top1(run_dir, capsys):
    want = _hand_accuracy()
    for backend in ("sparse", "reference"):
        assert moh_main(["eval", str(run_dir), "--backend", backend, "--batch-size", "16"]) == 0
        result = json.loads((run_dir / f"eval_test_{backend}.json").read_text())
        assert result["n"] == 40 and result["backend"] == backend
        assert result["acc"] == pytest.approx(want)
        assert result["heads_active"] == pytest.approx(0.75)
        assert "top-1" in capsys.readouterr().out


def test_eval_bad_input_is_one_clean_error(tmp_path, capsys):
    assert moh_main(["eval", str(tmp_path / "missing")]) == 2
    assert "not a finished run" in capsys.readouterr().err


def test_analyze_writes_pictures(run_dir, tmp_path, capsys):
    out = tmp_path / "pics"
    assert moh_main(["analyze", str(run_dir), "--out", str(out), "--max-batches", "1", "--batch-size", "8"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [  # a fixed top-k: active_fraction.png has nothing to show
        "head_choice.png", "head_load.png", "router_entropy.png", "routing_summary.json"]
    summary = json.loads((out / "routing_summary.json").read_text())
    assert summary["batches"] == 1 and summary["group_names"] == ["all"]  # random-images has no class names
    assert sum(summary["tokens_per_group"]) == 8 * 5  # 8 images x (2 x 2 patches + class token)


def test_throughput_counts_images():
    model = create_model("moh-vit-tiny-50", **TINY)
    ips = throughput(model, torch.randn(12, 1, 8, 8), batch_size=5, repeats=1)
    assert 0 < ips < float("inf")
