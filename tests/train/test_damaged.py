"""Damaged run directories: resume falls back to the newest intact checkpoint (saying which it
skipped and why), debris of interrupted saves / prunes goes, a partial last log line does not
block resume, and resuming a finished run writes nothing."""
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from moh.train import checkpoint as ckpt
from moh.train.engine import fit

STEPS = ["train.steps=6", "train.save_every=2", "train.keep_last=0", "train.log_every=1", "train.tensorboard=false",
         "train.batch_size=16", "data.args={size: 64, image_size: 8, num_classes: 4}"]


def no_timing(path):
    return [{k: v for k, v in json.loads(line).items() if k not in ("items_per_s", "step_time_s")}
            for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 6-step run with checkpoints at 2, 4, 6 (copied per test)."""
    from moh.train.config import RunConfig

    from .conftest import SMOKE

    out = tmp_path_factory.mktemp("finished") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests' own runs (conftest.one_thread, not active for module fixtures)
    try:
        fit(RunConfig.load(SMOKE, [f"train.out_dir={out}", *STEPS]))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def run(finished, tmp_path, smoke_cfg):
    """(out_dir, cfg maker) of a copy of the finished run."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out, lambda *extra: smoke_cfg(*STEPS, *extra)


def unfinish(out):
    """As if killed after the last checkpoint was written but before the end."""
    (out / "final.json").unlink()
    (out / "model.safetensors").unlink()


def same_weights(a, b):
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def damage(path, how):
    if how == "truncated_model":
        f = path / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
    elif how == "flipped_bit_optimizer":  # a valid file with other numbers: only the manifest sees it
        f = path / "optimizer.safetensors"
        data = bytearray(f.read_bytes())
        data[-5] ^= 0x10
        f.write_bytes(bytes(data))
    elif how == "no_state":
        (path / "state.json").unlink()
    elif how == "garbage_rng":
        (path / "rng_0.json").write_text("{not json")
    elif how == "empty_model_no_manifest":
        (path / "manifest.json").unlink()
        (path / "model.safetensors").write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated_model", "flipped_bit_optimizer", "no_state", "garbage_rng",
                                 "empty_model_no_manifest"])
def test_resume_skips_a_damaged_newest_checkpoint(run, finished, how, caplog):
    out, cfg = run
    unfinish(out)
    newest = out / "checkpoints" / "step_00000006"
    damage(newest, how)
    with caplog.at_level(logging.WARNING):
        result = fit(cfg("train.resume=true"))
    skipped = [r.getMessage() for r in caplog.records if "skipping damaged checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and "step_00000006" in skipped[0]
    assert json.loads((out / "final.json").read_text())["resumed_from"] == 4
    assert same_weights(out / "model.safetensors", finished / "model.safetensors")  # still exact
    assert no_timing(out / "metrics.jsonl") == no_timing(finished / "metrics.jsonl")
    assert (out / "checkpoints" / ".damaged-step_00000006").is_dir()  # kept for a look, never loaded again
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")][-1] == "step_00000006"  # written anew
    assert result.eval["n"] > 0


def test_every_checkpoint_damaged_is_an_error_naming_them(run):
    out, cfg = run
    unfinish(out)
    for p in ckpt.list_checkpoints(out / "checkpoints"):
        damage(p, "no_state")
    with pytest.raises(ValueError, match="no intact checkpoint.*step_00000006.*step_00000004.*step_00000002"):
        fit(cfg("train.resume=true"))


def test_leftovers_of_interrupted_saves_and_prunes_are_removed(run, caplog):
    out, cfg = run
    unfinish(out)
    root = out / "checkpoints"
    shutil.copytree(root / "step_00000002", root / ".del-step_00000002")
    (root / ".tmp-step_00000008").mkdir()
    with caplog.at_level(logging.WARNING):
        fit(cfg("train.resume=true"))
    assert not (root / ".del-step_00000002").exists() and not (root / ".tmp-step_00000008").exists()
    assert any(".del-step_00000002" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["metrics.jsonl", "eval.jsonl"])
def test_partial_last_log_line_is_dropped_with_a_warning(run, finished, name, caplog):
    out, cfg = run
    unfinish(out)
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    with (out / name).open("a") as f:
        f.write('{"step": 7, "loss": 0.3')  # killed in the middle of a write
    with caplog.at_level(logging.WARNING):
        fit(cfg("train.resume=true"))
    assert any("incomplete last line" in r.getMessage() and name in r.getMessage() for r in caplog.records)
    assert no_timing(out / "metrics.jsonl") == no_timing(finished / "metrics.jsonl")
    assert no_timing(out / "eval.jsonl") == no_timing(finished / "eval.jsonl")


def test_a_damaged_line_before_the_last_is_an_error_naming_file_and_line(run):
    out, cfg = run
    unfinish(out)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not a record"):
        fit(cfg("train.resume=true"))


def test_resuming_a_finished_run_writes_nothing(run):
    out, cfg = run
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    result = fit(cfg("train.resume=true"))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # no second final evaluation appended, no config / final.json rewritten
    assert len([r for r in map(json.loads, (out / "eval.jsonl").read_text().splitlines()) if r["step"] == 6]) == 1
    assert result.eval["acc"] == json.loads((out / "final.json").read_text())["acc"]
    assert [h["step"] for h in result.history] == [1, 2, 3, 4, 5, 6]


def test_killed_after_the_last_checkpoint_evaluates_once(run, finished):
    out, cfg = run
    unfinish(out)
    lines = (out / "eval.jsonl").read_text().splitlines()
    (out / "eval.jsonl").write_text("\n".join(lines[:-1]) + "\n" if lines[:-1] else "")  # the final eval never ran
    fit(cfg("train.resume=true"))
    assert no_timing(out / "eval.jsonl") == no_timing(finished / "eval.jsonl")
    assert same_weights(out / "model.safetensors", finished / "model.safetensors")
