import json

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moh.cli import main as moh_main
from moh.data import build_dataset
from moh.models import create_model
from moh.train.config import RunConfig
from moh.train.engine import evaluate, fit, load_run
from moh.models.base import accuracy_counts as batch_accuracy

from .conftest import SMOKE

TINY_MOH = "model.overrides={depth: 2, dim: 32, num_heads: 4, num_shared: 1, top_k: 2, image_size: 8, num_classes: 4}"


def test_grad_accumulation_matches_a_double_batch(smoke_cfg, tmp_path):
    """accum=2 with batch b == accum=1 with batch 2b for a deterministic model (MHA, no dropout)."""
    common = ["train.steps=3", "train.save_every=0", "optim.eps=1e-6", "train.metrics_csv=false"]
    a = fit(smoke_cfg(*common, "train.batch_size=8", "train.grad_accum=2", f"train.out_dir={tmp_path / 'a'}"))
    b = fit(smoke_cfg(*common, "train.batch_size=16", "train.grad_accum=1", f"train.out_dir={tmp_path / 'b'}"))
    torch.manual_seed(0)
    init = create_model("vit-tiny-mha", **smoke_cfg().model.overrides)
    moved = 0.0
    for (name, pa), pb, p0 in zip(a.model.named_parameters(), b.model.parameters(), init.parameters()):
        torch.testing.assert_close(pa, pb, atol=2e-6, rtol=1e-5, msg=name)
        moved = max(moved, (pa - p0).abs().max().item())
    assert moved > 1e-3  # the comparison is not between two untrained models
    assert a.history[-1]["task_loss"] == pytest.approx(b.history[-1]["task_loss"], rel=1e-5)


def test_loss_decreases_and_run_dir_is_complete(smoke_cfg):
    """The MoH model fits its (small) training set: evaluated on it, the loss drops."""
    cfg = smoke_cfg("model.name=moh-vit-tiny-50", TINY_MOH, "train.steps=30", "train.batch_size=16",
                    "train.log_every=10", "train.save_every=20", "optim.lr=3e-3", "optim.warmup_steps=3",
                    "data.args={size: 64, image_size: 8, num_classes: 4}")
    data = build_dataset("random-images", "train", **cfg.data.args)
    torch.manual_seed(cfg.train.seed)
    before = evaluate(create_model(cfg.model.name, **cfg.model.overrides), data)
    result = fit(cfg, eval_data=data)
    assert result.eval["loss"] < before["loss"] - 0.1
    assert result.history[-1]["task_loss"] < result.history[0]["task_loss"]
    assert [h["step"] for h in result.history] == [10, 20, 30]
    for key in ("loss", "task_loss", "aux_loss", "acc", "lr", "items_per_s", "heads_active", "step_time_s"):
        assert key in result.history[0]
    assert result.history[0]["heads_active"] == pytest.approx(3 / 4)  # 1 shared + top-2 of 4 heads
    assert result.history[0]["aux_loss"] > 0
    out = result.out_dir
    final = json.loads((out / "final.json").read_text())
    assert final["acc"] == pytest.approx(result.eval["acc"])
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("step,")
    tb = EventAccumulator(str(out / "tb"))
    tags = tb.Reload().Tags()["scalars"]
    assert {"metrics/loss", "metrics/heads_active", "eval/acc", "eval/loss"} <= set(tags)
    assert [e.step for e in tb.Scalars("metrics/loss")] == [10, 20, 30]
    model, loaded = load_run(out)
    assert loaded == cfg
    x = data[0]["images"][None]  # (1, 1, 8, 8)
    torch.testing.assert_close(model(x).logits, result.model.eval()(x).logits, atol=0, rtol=0)


def test_decoder_accuracy_and_loss_follow_the_shifted_convention():
    data = build_dataset("mqar", "test", num_examples=12, seq_len=32, num_kv_pairs=4, vocab_size=32)
    torch.manual_seed(0)
    model = create_model("moh-llm-tiny-50", vocab_size=32, dim=32, depth=1, num_heads=4, num_shared=1, top_k=1).eval()
    got = evaluate(model, data, batch_size=5)  # uneven batches: 5, 5, 2
    ids = torch.stack([d["input_ids"] for d in data])
    labels = torch.stack([d["labels"] for d in data])
    with torch.no_grad():
        logits = model(ids).logits
    valid = labels[:, 1:] != -100
    loss = F.cross_entropy(logits[:, :-1][valid], labels[:, 1:][valid])
    acc = (logits[:, :-1].argmax(-1)[valid] == labels[:, 1:][valid]).float().mean()
    assert got["n"] == 12
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert got["acc"] == pytest.approx(acc.item())


def test_batch_accuracy_by_hand():
    logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])  # predictions 1, 0, 1
    labels = torch.tensor([[5, 0, -100]])  # position 0 predicts 0 (wrong), 1 predicts -100 (ignored)
    assert batch_accuracy(logits, labels) == (0, 1)
    assert batch_accuracy(torch.tensor([[0.0, 2.0], [3.0, 1.0]]), torch.tensor([1, 1])) == (1, 2)


def test_decoder_fit_counts_tokens(smoke_cfg):
    cfg = smoke_cfg("model.name=moh-llm-tiny-50", "model.overrides={vocab_size: 32, dim: 32, depth: 1, num_heads: 4, num_shared: 1, top_k: 1}",
                    "data.name=mqar", "data.args={num_examples: 64, seq_len: 32, num_kv_pairs: 4, vocab_size: 32}",
                    "train.steps=2", "train.batch_size=8", "train.log_every=1", "train.save_every=0")
    result = fit(cfg)
    h = result.history[-1]
    assert h["items_per_s"] == pytest.approx(8 * 32 / h["step_time_s"], rel=1e-6)  # tokens, not sequences
    assert 0.0 <= result.eval["acc"] <= 1.0 and result.eval["n"] == 64


def test_unknown_config_key_is_an_error_naming_it(capsys):
    with pytest.raises(ValueError, match="train.bogus"):
        RunConfig.load(SMOKE, ["train.bogus=1"])
    assert moh_main(["train", str(SMOKE), "--set", "optim.nope=2"]) == 2
    assert "optim.nope" in capsys.readouterr().err


def test_bad_values_raise(smoke_cfg):
    with pytest.raises(ValueError, match="train.grad_accum=0"):
        fit(smoke_cfg("train.grad_accum=0"))
    with pytest.raises(ValueError, match="not a finished run"):
        load_run(SMOKE.parent / "nowhere")
