"""Resume continues the saved run: another seed, batch size, accumulation, model, data or
optimizer is an error naming both values; only rundir.RESUME_MAY_CHANGE may differ, and
config.yaml never claims what the run did not do."""
import json

import pytest

from moh.cli import main as moh_main
from moh.train import rundir
from moh.train.config import RunConfig
from moh.train.engine import fit

from .conftest import SMOKE

RUN = ["train.steps=4", "train.save_every=2", "train.log_every=1", "train.tensorboard=false", "train.batch_size=16",
       "train.seed=1", "data.args={size: 32, image_size: 8, num_classes: 4}"]


@pytest.fixture
def run(smoke_cfg, tmp_path):
    fit(smoke_cfg(*RUN))
    out = tmp_path / "run"
    return out, (out / "config.yaml").read_bytes()


@pytest.mark.parametrize("override, key, saved, given", [
    ("train.seed=0", "train.seed", "1", "0"),
    ("train.batch_size=8", "train.batch_size", "16", "8"),
    ("train.grad_accum=2", "train.grad_accum", "1", "2"),
    ("optim.lr=0.01", "optim.lr", "0.001", "0.01"),
    ("model.overrides.depth=3", "model.depth", "2", "3"),
    ("model.name=vit-tiny32-mha", "model.name", "'vit-tiny-mha'", "'vit-tiny32-mha'"),
    ("data.args.size=40", "data.args.size", "32", "40"),
    ("train.eval_batches=1", "train.eval_batches", "0", "1"),
])
def test_a_conflicting_resume_is_refused_naming_both_values(run, smoke_cfg, override, key, saved, given):
    out, config_before = run
    with pytest.raises(ValueError) as e:
        fit(smoke_cfg(*RUN, override, "train.resume=true"))
    assert f"{key}: the run has {saved}, this command gives {given}" in str(e.value)
    assert (out / "config.yaml").read_bytes() == config_before
    assert not (out / "resumes.jsonl").exists()


def interrupt(out):
    """As if killed after the step-2 checkpoint."""
    import shutil

    shutil.rmtree(out / "checkpoints" / "step_00000004")
    (out / "final.json").unlink()
    (out / "model.safetensors").unlink()


def test_harmless_changes_are_allowed_and_recorded_not_claimed(run, smoke_cfg):
    out, config_before = run
    interrupt(out)
    fit(smoke_cfg(*RUN, "train.log_every=2", "train.num_workers=1", "train.keep_last=1", "train.resume=true"))
    assert (out / "config.yaml").read_bytes() == config_before  # the run's config, not this command's
    (entry,) = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert entry["step"] == 2 and entry["changed"] == {"train.log_every": [1, 2], "train.num_workers": [0, 1],
                                                       "train.keep_last": [2, 1]}


def test_extending_the_run_records_the_new_length(run, smoke_cfg):
    out, _ = run
    result = fit(smoke_cfg(*RUN, "train.steps=6", "train.resume=true"))
    assert RunConfig.load(out / "config.yaml").train.steps == 6
    assert json.loads((out / "final.json").read_text())["step"] == 6 and result.history[-1]["step"] == 6
    (entry,) = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert entry == {**entry, "step": 4, "changed": {"train.steps": [4, 6]}}


def test_cli_resume_needs_no_config_and_keeps_the_saved_seed(run, capsys):
    out, _ = run
    assert moh_main(["train", "--resume", "--out", str(out), "--set", "train.steps=5"]) == 0
    saved = RunConfig.load(out / "config.yaml")
    assert saved.train.seed == 1 and saved.train.steps == 5 and saved.train.resume is False


def test_readme_resume_example_without_the_seed_is_refused(run, capsys):
    """The README's old example: resume with the config file but without --set train.seed=1."""
    out, config_before = run
    sets = [a for s in RUN if s != "train.seed=1" for a in ("--set", s)]
    assert moh_main(["train", str(SMOKE), *sets, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "train.seed: the run has 1, this command gives 0" in err and "moh train --resume --out" in err
    assert (out / "config.yaml").read_bytes() == config_before


def test_resume_and_overwrite_exclude_each_other():
    with pytest.raises(ValueError, match="exclude each other"):
        RunConfig.load(SMOKE, ["train.resume=true", "train.overwrite=true"])
    with pytest.raises(SystemExit) as e:  # argparse: not allowed together
        moh_main(["train", str(SMOKE), "--resume", "--overwrite"])
    assert e.value.code == 2


def test_the_list_of_keys_a_resume_may_change():
    assert set(rundir.RESUME_MAY_CHANGE) == {
        "train.steps", "train.log_every", "train.progress", "train.num_workers", "train.eval_every",
        "train.save_every", "train.keep_last", "train.metrics_csv", "train.tensorboard"}
