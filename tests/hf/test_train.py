"""The engine trains a MoH language model on memory-mapped token files and resumes it exactly."""
import json
import shutil

import torch
from safetensors.torch import load_file

from moh.train.engine import fit

from .conftest import lm_run_config


def test_resume_on_token_files_is_exact(lm_run, text_data, tmp_path):
    """The session's run (6 steps, checkpoints at 3 and 6) against a copy cut back to step 3 and resumed."""
    cut = tmp_path / "cut"
    shutil.copytree(lm_run, cut)
    for name in ("checkpoints/step_00000006", "model.safetensors", "final.json"):
        shutil.rmtree(cut / name) if (cut / name).is_dir() else (cut / name).unlink()
    result = fit(lm_run_config(cut, text_data["tokens"], "train.resume=true"))
    a, b = load_file(str(lm_run / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((cut / "final.json").read_text())["resumed_from"] == 3
    assert result.eval["heads_active"] == 0.5
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 6 and all(l > 0 for l in losses)
    ref = [json.loads(line)["loss"] for line in (lm_run / "metrics.jsonl").read_text().splitlines()]
    assert ref == losses  # the logged losses too, bit for bit
