import random

import numpy as np
import pytest
import torch
from torch import nn

from moh.train import checkpoint as ckpt


def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def save(root, step, model, opt, keep_last=0):
    return ckpt.save_checkpoint(root, step, model=model, optimizer=opt, state={"micro_batches": step}, keep_last=keep_last)


def test_roundtrip_restores_model_optimizer_and_generators(tmp_path):
    model, opt = tiny()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save(tmp_path, 7, model, opt)
    expect = (random.random(), np.random.rand(), torch.rand(3))
    model2 = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    torch.manual_seed(99)  # scramble the generators; loading must put them back
    state = ckpt.load_checkpoint(path, model=model2, optimizer=opt2)
    assert state["step"] == 7 and state["micro_batches"] == 7
    assert (random.random(), np.random.rand()) == expect[:2] and torch.equal(torch.rand(3), expect[2])
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(torch.as_tensor(s1["state"][i][k]), torch.as_tensor(s2["state"][i][k]))
    assert s1["param_groups"] == s2["param_groups"]


def test_crash_while_writing_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    model, opt = tiny()
    save(tmp_path, 1, model, opt)

    def crash(*args, **kwargs):
        raise OSError("disk died")

    monkeypatch.setattr(ckpt, "save_file", crash)  # dies after the directory is created
    with pytest.raises(OSError):
        save(tmp_path, 2, model, opt)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001"
    assert (tmp_path / ".tmp-step_00000002").exists()  # the debris is hidden, not visible as a step
    monkeypatch.undo()
    save(tmp_path, 2, model, opt)  # the next save cleans it up
    assert not (tmp_path / ".tmp-step_00000002").exists()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002"
    assert {p.name for p in ckpt.latest_checkpoint(tmp_path).iterdir()} == {
        "model.safetensors", "optimizer.safetensors", "state.json", "rng_0.safetensors", "rng_0.json", "manifest.json"}


def test_keep_last_n(tmp_path):
    model, opt = tiny()
    for step in range(1, 6):
        save(tmp_path, step, model, opt, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005"]  # no debris


def test_weights_that_do_not_fit_raise(tmp_path):
    model, _ = tiny()
    ckpt.save_weights(model, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="do not fit"):
        ckpt.load_weights(nn.Sequential(nn.Linear(4, 8)), tmp_path / "m.safetensors")
