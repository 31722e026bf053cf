"""Analysis pictures: nothing clipped at the edges (2-layer models included), pictures with nothing
to show skipped with a note (MHA: no router entropy; fixed top-k: no varying head count)."""
import json
import logging

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from moh.analysis.plots import nothing_to_show, write_pictures
from moh.analysis.routing import RoutingRecord
from moh.cli import main
from moh.models import create_model
from moh.train import checkpoint as ckpt
from moh.train.config import DataSpec, LoopConfig, ModelSpec, RunConfig

TINY = {"depth": 2, "dim": 32, "num_heads": 4, "image_size": 8, "num_classes": 4}


def run_dir(tmp_path, name, **extra):
    out = tmp_path / name
    out.mkdir()
    kw = {**TINY, **extra}
    cfg = RunConfig(model=ModelSpec(name, kw), data=DataSpec("random-images", {"size": 24, "image_size": 8, "num_classes": 4}),
                    train=LoopConfig(out_dir=str(out)))
    torch.manual_seed(0)
    cfg.save(out / "config.yaml")
    ckpt.save_weights(create_model(name, **kw), out / "model.safetensors")
    return out


def varying_record(L=2) -> RoutingRecord:
    """Layers that use more / fewer heads than configured, with router probabilities."""
    active = torch.tensor([[[10.0, 7, 5, 3]], [[10, 6, 6, 6]]], dtype=torch.float64)[:L]
    return RoutingRecord(group_names=["all"], active_LGH=active, tokens_LG=torch.full((L, 1), 10.0, dtype=torch.float64),
                         entropy_sum_L=torch.full((L,), 9.0, dtype=torch.float64),
                         entropy_tokens_L=torch.full((L,), 10.0, dtype=torch.float64), num_shared=[1] * L,
                         num_routed=[3] * L, expected_fraction=[0.6, 0.75][:L])


def border_is_blank(png) -> bool:
    """Every pixel of the outermost 3-pixel frame is the white background: no title, label or
    colour bar runs off the picture."""
    img = imread(str(png))[..., :3]
    frame = np.concatenate([img[:3].reshape(-1, 3), img[-3:].reshape(-1, 3), img[:, :3].reshape(-1, 3),
                            img[:, -3:].reshape(-1, 3)])
    return bool((frame > 0.98).all())


def test_every_picture_of_a_two_layer_model_fits_its_canvas(tmp_path):
    long_title = "moh-vit-tiny-50 on fashion-mnist/test, a rather long run title for a narrow figure"
    paths = write_pictures(varying_record(), tmp_path / "pics", title=long_title)
    pngs = [p for p in paths if p.suffix == ".png"]
    assert [p.name for p in pngs] == ["head_load.png", "head_choice.png", "router_entropy.png", "active_fraction.png"]
    for p in pngs:
        assert border_is_blank(p), f"{p.name}: something touches the edge (clipped)"


def test_mha_run_skips_entropy_and_active_fraction_with_a_note(tmp_path, caplog):
    out = tmp_path / "pics"
    with caplog.at_level(logging.INFO):
        assert main(["analyze", str(run_dir(tmp_path, "vit-tiny-mha")), "--out", str(out), "--batch-size", "8"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["head_choice.png", "head_load.png", "routing_summary.json"]
    skipped = json.loads((out / "routing_summary.json").read_text())["skipped"]
    assert set(skipped) == {"router_entropy.png", "active_fraction.png"}
    assert "no layer has router probabilities" in skipped["router_entropy.png"]
    assert any("not drawing router_entropy.png" in r.getMessage() for r in caplog.records)
    for p in out.glob("*.png"):
        assert border_is_blank(p), p.name


def test_fixed_top_k_skips_only_the_active_fraction(tmp_path):
    out = tmp_path / "pics"
    run = run_dir(tmp_path, "moh-vit-tiny-50", num_shared=1, top_k=2)
    assert main(["analyze", str(run), "--out", str(out), "--batch-size", "8"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "router_entropy.png" in names and "active_fraction.png" not in names
    assert "fixed top-k" in json.loads((out / "routing_summary.json").read_text())["skipped"]["active_fraction.png"]


def test_nothing_to_show_is_empty_when_layers_vary():
    assert nothing_to_show(varying_record()) == {}


def test_pictures_are_not_written_through_a_symlink(tmp_path):
    out = tmp_path / "pics"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (out / "head_load.png").symlink_to(victim)
    with pytest.raises(ValueError, match="symbolic link"):
        write_pictures(varying_record(), out)
    assert victim.read_text() == "keep"
