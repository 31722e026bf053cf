"""Run directories: a run is never replaced by accident, nothing is written before a run has
started, one run at a time per directory, unusable paths are named before any work."""
import json
import os

import pytest

from moh.cli import main as moh_main
from moh.train import engine
from moh.train import rundir
from moh.train.engine import fit

QUICK = ["train.steps=2", "train.save_every=1", "train.log_every=1", "train.tensorboard=false", "train.batch_size=16",
         "data.args={size: 32, image_size: 8, num_classes: 4}"]


def files(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture
def old_run(smoke_cfg, tmp_path):
    fit(smoke_cfg(*QUICK, "train.seed=7"))
    out = tmp_path / "run"
    return out, files(out)


def test_a_new_run_into_a_run_directory_is_refused_and_changes_nothing(old_run, smoke_cfg):
    out, before = old_run
    with pytest.raises(ValueError, match=r"already holds a run \(config\.yaml, model\.safetensors.*--resume.*--overwrite"):
        fit(smoke_cfg(*QUICK))
    assert files(out) == before


def test_overwrite_moves_the_old_run_aside_then_deletes_it_when_the_new_one_finished(old_run, smoke_cfg):
    out, before = old_run
    (out / "notes.txt").write_text("mine")  # not a run's file: never touched
    fit(smoke_cfg(*QUICK, "train.overwrite=true"))
    assert not (out / rundir.OVERWRITTEN).exists()
    assert (out / "notes.txt").read_text() == "mine"
    saved = (out / "config.yaml").read_text()
    assert "seed: 0" in saved and "overwrite: false" in saved  # the new run's; a command flag is not the run's
    assert files(out)["model.safetensors"] != before["model.safetensors"]


def test_overwrite_keeps_the_old_run_when_the_new_one_fails(old_run, smoke_cfg, monkeypatch):
    out, before = old_run

    def boom(*args, **kwargs):
        raise FloatingPointError("loss is nan")

    monkeypatch.setattr(engine, "_train_step", boom)
    with pytest.raises(FloatingPointError):
        fit(smoke_cfg(*QUICK, "train.overwrite=true"))
    kept = files(out / rundir.OVERWRITTEN)
    assert kept == {k: v for k, v in before.items()}  # every file of the old run, byte for byte
    assert "seed: 0" in (out / "config.yaml").read_text()  # the directory holds only the new run's files


def test_nothing_is_written_before_the_run_starts(smoke_cfg, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="data.args.bogus"):  # bad data arguments
        fit(smoke_cfg(*QUICK, "data.args={bogus: 1}"))
    with pytest.raises(ValueError, match=r"model 'vit-tiny-mha' and data 'mqar' do not fit"):  # model / data mismatch
        fit(smoke_cfg(*QUICK, "data.name=mqar", "data.args={num_examples: 32, seq_len: 16, num_kv_pairs: 2, vocab_size: 32}"))

    def broken(*args, **kwargs):
        raise ValueError("the data set is broken")

    monkeypatch.setattr(engine, "build_dataset", broken)
    with pytest.raises(ValueError, match="broken"):
        fit(smoke_cfg(*QUICK))
    assert not out.exists()


def test_a_second_run_is_locked_out_naming_the_holder(smoke_cfg, tmp_path):
    out = tmp_path / "run"
    holder = rundir.RunLock(out).acquire()  # another run in progress (any process: flock is per open file)
    try:
        with pytest.raises(ValueError, match=rf"{out}.* is in use by another run \(pid {os.getpid()}\)"):
            fit(smoke_cfg(*QUICK, "train.resume=true"))
    finally:
        holder.release()
    fit(smoke_cfg(*QUICK))  # free again
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("case", ["file", "under_a_file", "read_only"])
def test_an_unusable_out_dir_is_named_before_any_work(smoke_cfg, tmp_path, monkeypatch, case):
    target = tmp_path / "x"
    if case == "file":
        target.write_text("")
        expect = "exists and is not a directory"
    elif case == "under_a_file":
        (tmp_path / "f").write_text("")
        target = tmp_path / "f" / "run"
        expect = "is a file, not a directory"
    else:  # root bypasses permission bits: simulate what os.access reports on a read-only mount
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
        expect = "is not writable"
    built = []
    monkeypatch.setattr(engine, "build_model", lambda *a, **k: built.append(1))
    with pytest.raises(ValueError, match=expect) as e:
        fit(smoke_cfg(*QUICK, f"train.out_dir={target}"))
    assert str(target) in str(e.value) and not built  # failed before building anything


def test_cli_overwrite_flag_and_refusal_message(old_run, capsys):
    out, before = old_run
    from .conftest import SMOKE

    sets = [a for s in QUICK for a in ("--set", s)]
    assert moh_main(["train", str(SMOKE), "--out", str(out), *sets]) == 2
    assert "already holds a run" in capsys.readouterr().err and files(out) == before
    assert moh_main(["train", str(SMOKE), "--out", str(out), "--overwrite", *sets]) == 0
    assert json.loads((out / "final.json").read_text())["step"] == 2


def test_check_writable_file_refuses_symlinks_and_directories(tmp_path):
    (tmp_path / "d").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    with pytest.raises(ValueError, match="is a directory"):
        rundir.check_writable_file(tmp_path / "d")
    with pytest.raises(ValueError, match="symbolic link"):
        rundir.check_writable_file(tmp_path / "link")
    assert rundir.check_writable_file(tmp_path / "new" / "x.json") == tmp_path / "new" / "x.json"
