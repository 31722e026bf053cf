"""A run killed with SIGKILL and resumed ends with exactly the parameters of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from .conftest import REPO, SMOKE

# MoH with dropout and drop-path (generator state matters), accumulation, several epochs of data
ARGS = [
    "--set", "model.name=moh-vit-tiny-50",
    "--set", "model.overrides={depth: 2, dim: 32, num_heads: 4, num_shared: 1, top_k: 2, image_size: 8, "
             "num_classes: 4, dropout: 0.1, drop_path: 0.1}",
    "--set", "data.args={size: 48, image_size: 8, num_classes: 4}",
    "--set", "train.steps=24", "--set", "train.batch_size=8", "--set", "train.grad_accum=2",
    "--set", "train.save_every=3", "--set", "train.keep_last=2", "--set", "train.log_every=1",
]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def train(out_dir, *extra):
    return subprocess.Popen([sys.executable, "-m", "moh.cli", "train", str(SMOKE), "--out-dir", str(out_dir), *ARGS, *extra],
                            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc):
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err


def kill_after_first_checkpoint(proc, ckpt_dir, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not any(p.name.startswith("step_") for p in ckpt_dir.glob("step_*")):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def strip_timing(path):
    return [{k: v for k, v in json.loads(line).items() if k not in ("items_per_s", "step_time_s")}
            for line in path.read_text().splitlines()]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    procs = [train(ref), train(cut)]
    kill_after_first_checkpoint(procs[1], cut / "checkpoints")
    assert not (cut / "model.safetensors").exists()  # really interrupted
    killed_at = max(int(p.name[5:]) for p in (cut / "checkpoints").glob("step_*"))
    assert killed_at < 24
    finish(train(cut, "--resume"))
    finish(procs[0])
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert strip_timing(ref / "metrics.jsonl") == strip_timing(cut / "metrics.jsonl")
    assert json.loads((cut / "final.json").read_text())["resumed_from"] == killed_at
