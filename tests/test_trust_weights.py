"""Weights that do not fit never load: every loader (``load_weights``, ``load_full_state``,
``load_checkpoint``, ``load_run``, ``moh eval``) refuses missing, unexpected, mis-shaped and
wrongly typed tensors, damaged files and NaN weights with one error naming the file and the
tensors, and leaves the model as it was."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moh.cli import main as moh_main
from moh.models import create_model
from moh.train import checkpoint as ckpt
from moh.train.config import DataSpec, LoopConfig, ModelSpec, RunConfig
from moh.train.distributed import load_full_state, tied_groups
from moh.train.engine import load_run

TINY = {"depth": 2, "dim": 32, "num_heads": 4, "num_shared": 1, "top_k": 2, "image_size": 8, "num_classes": 4}
MHA = {"depth": 2, "dim": 32, "num_heads": 4, "image_size": 8, "num_classes": 4}


def vit(name="moh-vit-tiny-50", seed=0, **kw):
    torch.manual_seed(seed)
    return create_model(name, **{**TINY, **kw} if name.startswith("moh") else {**MHA, **kw})


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a refused load"


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "model.safetensors"
    ckpt.save_weights(vit(), path)
    return path


def test_good_weights_load_exactly(weights):
    model = vit(seed=1)
    ckpt.load_weights(model, weights)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), vit().state_dict().values()))


@pytest.mark.parametrize("case, expect", [
    ("one_more_layer", r"missing \(blocks\.2\."),
    ("one_less_layer", r"unexpected \(blocks\.1\."),
    ("mha_weights_under_moh", r"missing \(blocks\.0\.attn\.router"),
    ("wider", r"43 that do not match \(blocks\.0\.attn\.k_proj\.bias has shape \(64,\) in the file, \(32,\) in the model"),
])
def test_model_that_does_not_fit_the_file_is_refused(weights, case, expect):
    if case == "one_more_layer":
        model = vit(depth=3)
    elif case == "one_less_layer":
        model = vit(depth=1)
    elif case == "mha_weights_under_moh":
        ckpt.save_weights(vit("vit-tiny-mha"), weights)
        model = vit()
    else:
        ckpt.save_weights(vit(dim=64), weights)
        model = vit()
    before = snapshot(model)
    with pytest.raises(ValueError, match=expect) as e:
        ckpt.load_weights(model, weights)
    assert str(weights) in str(e.value) and "do not fit" in str(e.value)
    assert_unchanged(model, before)


def test_a_removed_or_added_or_retyped_tensor_is_named(weights):
    sd = load_file(str(weights))
    removed = dict(sd)
    del removed["blocks.1.attn.router.w_routed.weight"]
    cases = {
        "removed": (removed, r"1 missing \(blocks\.1\.attn\.router\.w_routed\.weight\)"),
        "added": ({**sd, "extra.weight": torch.zeros(2)}, r"1 unexpected \(extra\.weight\)"),
        "int": ({**sd, "head.bias": torch.zeros(4, dtype=torch.int64)}, r"head\.bias is torch\.int64 in the file"),
    }
    for name, (tensors, expect) in cases.items():
        save_file(tensors, str(weights))
        model = vit(seed=1)
        before = snapshot(model)
        with pytest.raises(ValueError, match=expect):
            ckpt.load_weights(model, weights)
        assert_unchanged(model, before)
    save_file({k: v.to(torch.float64) for k, v in sd.items()}, str(weights))  # float64 -> float32 is a safe cast
    ckpt.load_weights(vit(seed=1), weights)


def test_many_missing_are_listed_a_few_then_counted(weights):
    with pytest.raises(ValueError, match=r"missing \([^)]*, [^)]*, [^)]*, [^)]*, [^)]* and \d+ more\)"):
        ckpt.load_weights(vit(depth=4), weights)


def test_load_full_state_checks_before_torch_fills_the_dict():
    """torch's set_model_state_dict copies the model's own tensors into the caller's dict, so its
    missing-keys report is empty: the check must compare against the model itself."""
    model = vit()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    del sd["norm.weight"]
    with pytest.raises(ValueError, match=r"missing \(norm\.weight\)"):
        load_full_state(model, sd)
    assert "norm.weight" not in sd  # nothing was filled in behind the check


def test_tied_weights_round_trip_and_disagreeing_copies_are_refused(tmp_path):
    torch.manual_seed(0)
    kw = dict(vocab_size=32, dim=32, depth=1, num_heads=4, num_shared=1, top_k=1)
    model = create_model("moh-llm-tiny-50", **kw)
    (tied,) = tied_groups(model)  # the embedding and the output head: one tensor
    path = tmp_path / "m.safetensors"
    ckpt.save_weights(model, path)
    sd = load_file(str(path))
    kept = [k for k in tied if k in sd]
    assert len(kept) == 1  # stored once
    other = create_model("moh-llm-tiny-50", **kw)
    ckpt.load_weights(other, path)
    named = dict(other.named_parameters(remove_duplicate=False))
    assert named[tied[0]] is named[tied[1]] and torch.equal(named[tied[0]], sd[kept[0]])
    dropped = next(k for k in tied if k not in sd)
    save_file({**sd, dropped: sd[kept[0]] + 1}, str(path))
    with pytest.raises(ValueError, match="tied"):
        ckpt.load_weights(other, path)


@pytest.mark.parametrize("damage", ["truncated", "empty", "random", "header_only", "directory", "missing"])
def test_damaged_weights_file_is_a_clear_error_naming_it(weights, damage):
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "random":
        weights.write_bytes(os.urandom(4096))
    elif damage == "header_only":
        weights.write_bytes(data[:40])
    elif damage == "directory":
        weights.unlink()
        weights.mkdir()
    else:
        weights.unlink()
    with pytest.raises(ValueError) as e:
        ckpt.load_weights(vit(), weights)
    assert str(weights) in str(e.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused(weights, bad):
    sd = load_file(str(weights))
    sd["blocks.0.mlp.fc1.weight"][0, 0] = bad
    save_file(sd, str(weights))
    with pytest.raises(ValueError, match=r"NaN or infinite values: blocks\.0\.mlp\.fc1\.weight"):
        ckpt.load_weights(vit(), weights)


def test_checkpoint_that_does_not_fit_is_refused_and_changes_nothing(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    path = ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, state={"micro_batches": 1})
    wider = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    wopt = torch.optim.AdamW(wider.parameters(), lr=1e-2)
    before, rng = snapshot(wider), torch.get_rng_state()
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors: weights do not fit.*0\.weight has shape"):
        ckpt.load_checkpoint(path, model=wider, optimizer=wopt)
    assert_unchanged(wider, before)
    assert torch.equal(torch.get_rng_state(), rng) and not wopt.state  # generators and optimizer untouched
    # same model, optimizer state of other shapes (another model's optimizer.safetensors)
    other = ckpt.save_checkpoint(tmp_path / "w", 1, model=wider, optimizer=wopt, state={"micro_batches": 1})
    (path / "optimizer.safetensors").write_bytes((other / "optimizer.safetensors").read_bytes())
    (path / "manifest.json").unlink()  # only the structural checks are left to find it
    with pytest.raises(ckpt.CheckpointError, match="optimizer state does not fit"):
        ckpt.load_checkpoint(path, model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))


# ---------------------------------------------------------------------------------------------
# through load_run and the command line


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cfg = RunConfig(model=ModelSpec("moh-vit-tiny-50", dict(TINY)),
                    data=DataSpec("random-images", {"size": 40, "image_size": 8, "num_classes": 4}),
                    train=LoopConfig(out_dir=str(out)))
    cfg.save(out / "config.yaml")
    ckpt.save_weights(vit(), out / "model.safetensors")
    return out


def _eval(run_dir, capsys, *extra):
    code = moh_main(["eval", str(run_dir), "--batch-size", "16", *extra])
    return code, capsys.readouterr()


def test_eval_refuses_weights_of_another_model(run_dir, capsys):
    ckpt.save_weights(vit(depth=1), run_dir / "model.safetensors")
    code, io = _eval(run_dir, capsys)
    assert code == 2 and "model.safetensors" in io.err and "blocks.1." in io.err and "top-1" not in io.out
    assert not list(run_dir.glob("eval_*.json"))


def test_eval_refuses_a_config_that_does_not_fit_the_weights(run_dir, capsys):
    cfg = RunConfig.load(run_dir / "config.yaml", ["model.overrides.depth=3"])
    cfg.save(run_dir / "config.yaml")
    code, io = _eval(run_dir, capsys)
    assert code == 2 and "missing" in io.err and "blocks.2." in io.err


@pytest.mark.parametrize("damage", ["truncated", "random", "nan"])
def test_eval_of_damaged_or_nan_weights_exits_nonzero_without_traceback(run_dir, capsys, damage):
    f = run_dir / "model.safetensors"
    if damage == "truncated":
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "random":
        f.write_bytes(os.urandom(1000))
    else:
        sd = load_file(str(f))
        sd = {k: torch.full_like(v, float("nan")) for k, v in sd.items()}
        save_file(sd, str(f))
    code, io = _eval(run_dir, capsys)
    assert code == 2 and str(f) in io.err and "Traceback" not in io.err and "top-1" not in io.out


def test_load_run_notices_weights_changed_after_the_run(run_dir):
    f = run_dir / "model.safetensors"
    (run_dir / "final.json").write_text(json.dumps({"step": 1, "model_sha256": ckpt.sha256_file(f)}))
    load_run(run_dir)  # as written: fine
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # one flipped bit in a weight: still a valid file
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_run(run_dir)


def test_load_run_of_a_file_or_missing_dir_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file", tmp_path / "nowhere"):
        with pytest.raises(ValueError, match="not a finished run"):
            load_run(bad)
