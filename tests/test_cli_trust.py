"""First contact with the command line: --version, a pipe closed early, shipped configs found from
any directory, --print-config, one flag spelling everywhere, a log line without a terminal, and
output paths (directories, files, symlinks, OS errors) named in one line with exit code 2."""
import argparse
import gzip
import json
import logging
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

from moh.cli import COMMANDS, build_parser, main
from moh.models import create_model
from moh.train import checkpoint as ckpt
from moh.train.cli import CONFIG_DIR
from moh.train.config import DataSpec, LoopConfig, ModelSpec, RunConfig

REPO = Path(__file__).parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
TINY = {"depth": 2, "dim": 32, "num_heads": 4, "num_shared": 1, "top_k": 2, "image_size": 8, "num_classes": 4}


def moh(*args, cwd=REPO, shell=None):
    cmd = shell if shell is not None else [sys.executable, "-m", "moh.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300, shell=shell is not None)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("moh ")


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_help_prints(command, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"] if command is None else [command, "--help"])
    assert e.value.code == 0 and "usage: moh" in capsys.readouterr().out


def test_a_pipe_closed_early_is_no_traceback():
    proc = moh(shell=f"{sys.executable} -m moh.cli models | head -1")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_shipped_configs_are_package_data_and_found_from_anywhere(tmp_path, capsys, monkeypatch):
    assert CONFIG_DIR.parent.name == "moh" and (CONFIG_DIR / "smoke.yaml").is_file()
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--list-configs"]) == 0
    listed = capsys.readouterr().out
    assert "smoke" in listed and "fmnist-vit-tiny-moh50" in listed
    proc = moh("train", "smoke", "--set", "train.steps=2", "--set", "train.save_every=0", "--set",
               "train.tensorboard=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "runs" / "smoke" / "model.safetensors").is_file()
    assert "step 2/2" in proc.stderr and "eta" in proc.stderr  # no terminal: a log line instead of a bar


def test_shipped_configs_leave_progress_to_the_terminal():
    for path in CONFIG_DIR.glob("*.yaml"):
        cfg = RunConfig.load(path)
        assert cfg.train.progress is True, path  # bar on a terminal, log lines otherwise


def test_packaging_ships_configs_and_requires_a_torch_range():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    torch_req = [d for d in meta["project"]["dependencies"] if d.startswith("torch")]
    assert torch_req and "==" not in torch_req[0] and ">=" in torch_req[0]
    assert "configs/*.yaml" in meta["tool"]["setuptools"]["package-data"]["moh"]
    assert "torch==2.13.0" in (REPO / "Makefile").read_text()  # the setup step still pins what it installs first
    assert (REPO / "src" / "moh" / "configs").resolve() == (REPO / "configs").resolve()


def test_print_config_prints_the_resolved_yaml_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", "smoke", "--out", str(out), "--set", "optim.lr=3e-4", "--set", "train.metrics_csv=false",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 3e-4 and printed["train"]["out_dir"] == str(out)
    assert printed["train"]["metrics_csv"] is False and "csv" not in printed["train"]
    assert RunConfig.from_dict(printed).optim.lr == 3e-4
    assert not out.exists()


def test_one_spelling_for_output_and_batch_flags():
    for command in ("train", "eval", "analyze", "bench"):
        parser = build_parser(command)
        sub = parser._subparsers._group_actions[0].choices[command]
        options = {o for a in sub._actions if a.help != argparse.SUPPRESS for o in a.option_strings}
        assert "--out" in options, command
        if command != "train":
            assert "--batch-size" in options and "--batch" not in options, command
    train_help = build_parser("train")._subparsers._group_actions[0].choices["train"].format_help()
    assert "--out-dir" not in train_help  # kept as a hidden alias
    args = build_parser("train").parse_args(["train", "smoke", "--out-dir", "x"])
    assert args.out == "x"


def test_log_line_every_log_every_steps_without_a_terminal(smoke_cfg_any, caplog):
    from moh.train.engine import fit

    with caplog.at_level(logging.INFO, logger="moh.train.engine"):
        fit(smoke_cfg_any("train.steps=4", "train.log_every=2", "train.save_every=0", "train.tensorboard=false"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 2 and lines[0].startswith("step 2/4  loss ") and "items/s" in lines[0] and "eta" in lines[0]


@pytest.fixture
def smoke_cfg_any(tmp_path):
    def make(*overrides):
        return RunConfig.load(CONFIG_DIR / "smoke.yaml", [f"train.out_dir={tmp_path / 'run'}", *overrides])

    return make


# ---------------------------------------------------------------------------------------------
# output paths


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cfg = RunConfig(model=ModelSpec("moh-vit-tiny-50", dict(TINY)),
                    data=DataSpec("random-images", {"size": 24, "image_size": 8, "num_classes": 4}),
                    train=LoopConfig(out_dir=str(out)))
    torch.manual_seed(0)
    cfg.save(out / "config.yaml")
    ckpt.save_weights(create_model("moh-vit-tiny-50", **TINY), out / "model.safetensors")
    return out


def test_eval_never_writes_through_a_planted_symlink(run_dir, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, run_dir / "eval_test_sparse.json")
    assert main(["eval", str(run_dir)]) == 2
    assert "symbolic link" in capsys.readouterr().err and victim.read_text() == "keep me"
    assert main(["eval", str(run_dir), "--out", str(run_dir / "eval_test_sparse.json")]) == 2
    assert victim.read_text() == "keep me"
    (run_dir / "eval_test_sparse.json").unlink()
    assert main(["eval", str(run_dir)]) == 0
    written = run_dir / "eval_test_sparse.json"
    assert not written.is_symlink() and json.loads(written.read_text())["n"] == 24
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # the temporary file is gone


@pytest.mark.parametrize("command, kind", [("eval", "dir"), ("eval", "under_file"), ("analyze", "file"),
                                           ("bench", "dir")])
def test_unusable_out_paths_are_named_before_the_work(run_dir, tmp_path, capsys, command, kind):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_dir").mkdir()
    out = {"dir": tmp_path / "a_dir", "file": tmp_path / "a_file", "under_file": tmp_path / "a_file" / "x.json"}[kind]
    argv = {"eval": ["eval", str(run_dir)], "analyze": ["analyze", str(run_dir)], "bench": ["bench", "--quick"]}[command]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "Traceback" not in err
    assert not list((tmp_path / "a_dir").iterdir())  # nothing was produced


def test_os_errors_are_one_line_with_exit_code_2(monkeypatch, capsys):
    import moh.models.cli as models_cli

    def denied(args):
        raise PermissionError(13, "Permission denied", "/some/where")

    monkeypatch.setattr(models_cli, "run", denied)
    assert main(["models"]) == 2
    assert capsys.readouterr().err.strip() == "moh models: error: '/some/where': permission denied"


def test_train_into_an_unwritable_place_is_named(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert main(["train", "smoke", "--out", str(tmp_path / "f" / "run")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_fetch_of_a_damaged_compressed_file_is_one_line(tmp_path, capsys):
    d = tmp_path / "fashion-mnist"
    d.mkdir()
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0" * 1000)[:30])  # truncated
    assert main(["data", "fetch", "fashion-mnist", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "damaged" in err and "Traceback" not in err
