"""moh sample / eval / analyze on a (tiny) DiT run: files, determinism, bad input, domain FID."""
import json

import pytest
import torch
from PIL import Image

from moh.cli import main as moh_main

from .dit_fixtures import train_tiny_dit, write_fake_fmnist


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("dit")
    torch.set_num_threads(1)
    root = write_fake_fmnist(base / "data")
    return train_tiny_dit(root, base / "run"), root


def sample(run, out, *args):
    return moh_main(["sample", str(run), "--out", str(out), "--steps", "3", *args])


def test_sample_writes_a_grid_per_class_and_a_combined_one(dit_run, tmp_path):
    run, _ = dit_run
    assert sample(run, tmp_path / "a", "--classes", "0,3", "--per-class", "3", "--cfg-scale", "4") == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["class_0_t-shirt-top.png", "class_3_dress.png", "grid.png", "samples.json"]
    assert Image.open(tmp_path / "a" / "class_0_t-shirt-top.png").size == (2 * (3 * 30 + 2), 2 * 32)
    assert Image.open(tmp_path / "a" / "grid.png").size == (2 * (3 * 30 + 2), 2 * (2 * 30 + 2))
    meta = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert meta["classes"] == [0, 3] and meta["ema"] is True and meta["images_per_s"] > 0
    # same seed: the same images; a class's images do not depend on the other classes asked for
    assert sample(run, tmp_path / "b", "--classes", "3", "--per-class", "3", "--cfg-scale", "4") == 0
    same = (tmp_path / "b" / "class_3_dress.png").read_bytes() == (tmp_path / "a" / "class_3_dress.png").read_bytes()
    assert same
    assert sample(run, tmp_path / "c", "--classes", "3", "--per-class", "3", "--cfg-scale", "4", "--seed", "1") == 0
    assert (tmp_path / "c" / "class_3_dress.png").read_bytes() != (tmp_path / "a" / "class_3_dress.png").read_bytes()
    assert sample(run, tmp_path / "d", "--classes", "1", "--per-class", "2", "--scheduler", "dpm") == 0


@pytest.mark.parametrize("args, message", [
    (["--classes", "0,10"], "class index 10 is not in [0, 10)"),
    (["--classes", "0,x"], "class index 'x' is not an integer"),
    (["--cfg-scale", "-1"], "cfg scale=-1.0 must be a number >= 0"),
    (["--steps", "0"], "steps=0 must be a positive integer"),
    (["--per-class", "0"], "--per-class=0 must be >= 1"),
    (["--cfg-scale", "inf"], "--cfg-scale=inf must be a finite number"),  # every image NaN, saved black
])
def test_sample_bad_input_is_one_error_naming_the_value(dit_run, tmp_path, capsys, args, message):
    run, _ = dit_run
    assert moh_main(["sample", str(run), "--out", str(tmp_path / "never"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()  # nothing written


def test_eval_reports_domain_fid_with_the_extractor_checksum(dit_run, capsys):
    run, root = dit_run
    rc = moh_main(["eval", str(run), "--num-samples", "20", "--steps", "2", "--throughput-images", "2",
                   "--max-batches", "1", "--cfg-scale", "2"])
    assert rc == 0
    result = json.loads((run / "eval_fid_classifier.json").read_text())
    sha = result["extractor_sha256"]
    assert (root / "extractors" / "fashion-mnist-cnn-s0.safetensors").is_file()  # trained once, kept
    label = (f"domain FID (Fashion-MNIST classifier features, sha256 {sha}), comparable only between runs with "
             "the same extractor")
    assert result["fid_kind"] == label and label in capsys.readouterr().out
    assert result["fid"] > 0 and result["num_generated"] == 20 and result["num_real"] == 100
    assert set(result["sampling_images_per_s"]) == {"sparse", "masked"} and result["denoise_loss"] > 0
    assert moh_main(["eval", str(run), "--num-samples", "20", "--extractor-sha256", "0" * 64]) == 2
    assert f"has sha256 {sha}" in capsys.readouterr().err
    assert moh_main(["eval", str(run), "--num-samples", "15"]) == 2  # not a multiple of the 10 classes
    assert "--num-samples=15" in capsys.readouterr().err


def test_analyze_writes_head_load_per_class_and_timestep(dit_run, tmp_path, capsys):
    run, _ = dit_run
    assert moh_main(["analyze", str(run), "--out", str(tmp_path / "an"), "--max-batches", "1"]) == 0
    for name in ("head_load.png", "head_load_timestep.png", "head_load_shift.png", "routing_summary.json",
                 "routing_timestep.json"):
        assert (tmp_path / "an" / name).is_file(), name
    by_t = json.loads((tmp_path / "an" / "routing_timestep.json").read_text())
    assert by_t["group_names"] == ["t 0-249", "t 250-499", "t 500-749", "t 750-999"]
    by_class = json.loads((tmp_path / "an" / "routing_summary.json").read_text())
    assert by_class["group_names"][0] == "T-shirt/top" and len(by_class["head_load"]) == 2
    assert by_class["active_fraction"] == [pytest.approx(0.75), pytest.approx(1.0)]


def test_sample_and_eval_name_an_image_size_the_patch_size_does_not_divide(dit_run, tmp_path, capsys):
    import yaml

    run, _ = dit_run
    bad = tmp_path / "bad_run"
    bad.mkdir()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["overrides"]["patch_size"] = 3  # 28 x 28 images
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    (bad / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    for cmd in (["sample", str(bad), "--out", str(tmp_path / "never")], ["eval", str(bad)]):
        assert moh_main(cmd) == 2
        assert "image_size=28 is not divisible by patch_size=3" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    assert moh_main(["sample", str(run), "--out", str(tmp_path / "never"), "--steps", "-3"]) == 2
    assert "steps=-3 must be a positive integer" in capsys.readouterr().err


def test_outputs_are_checked_before_the_work_and_never_written_through_a_link(dit_run, tmp_path, capsys):
    """Issue 12's class: ``moh eval`` of a DiT checks its own result files (not the classifier's
    name) before sampling, and refuses a planted symbolic link; ``--out ''`` is not the default."""
    import shutil

    run, _ = dit_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    victim = tmp_path / "victim"
    victim.write_text("keep")
    for name in ("eval_fid_classifier.json", "eval_fid_classifier.samples.safetensors"):  # an earlier test's
        (copy / name).unlink(missing_ok=True)
    (copy / "eval_fid_classifier.samples.safetensors").symlink_to(victim)
    assert moh_main(["eval", str(copy), "--steps", "1", "--num-samples", "10"]) == 2
    assert "symbolic link" in capsys.readouterr().err and victim.read_text() == "keep"
    assert not (copy / "eval_fid_classifier.json").exists()
    assert moh_main(["sample", str(copy), "--out", "", "--steps", "1"]) == 2
    assert "--out '' is empty" in capsys.readouterr().err and not (copy / "samples").exists()
