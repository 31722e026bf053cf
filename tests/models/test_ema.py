"""The EMA of a model's weights: update maths, warm-up, its place in the state dict, swapping."""
import pytest
import torch
from safetensors.torch import load_file, save_model
from torch import nn

from moh.models import create_model
from moh.models.ema import EMA

TINY = dict(dim=32, depth=2, num_heads=4, image_size=8, patch_size=2, num_classes=4, layer_heads=[[1, 2], [4, 0]])


def test_update_is_the_exponential_average():
    lin = nn.Linear(3, 2)
    p0 = [p.detach().clone() for p in lin.parameters()]
    ema = EMA(lin.named_parameters(), decay=0.9)
    steps = []
    for _ in range(3):
        with torch.no_grad():
            for p in lin.parameters():
                p.add_(torch.randn_like(p))
        steps.append([p.detach().clone() for p in lin.parameters()])
        ema.update(lin.named_parameters())
    for i, name in enumerate(["weight", "bias"]):
        want = p0[i]
        for s in steps:
            want = 0.9 * want + 0.1 * s[i]
        torch.testing.assert_close(ema.shadow(name), want, atol=1e-6, rtol=1e-6)
    assert int(ema.num_updates) == 3


def test_warmup_decay_and_validation():
    ema = EMA([], decay=0.999, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(90) == pytest.approx(0.91)
    assert ema.decay_at(10**6) == 0.999
    assert EMA([], decay=0.99).decay_at(0) == 0.99
    with pytest.raises(ValueError, match="ema decay=1.5"):
        EMA([], decay=1.5)


def test_dit_keeps_its_ema_in_the_state_dict(tmp_path):
    torch.manual_seed(0)
    model = create_model("moh-dit-tiny-90", ema_decay=0.5, ema_warmup=False, **TINY)
    sd = model.state_dict()
    names = [n for n, _ in model.named_parameters()]
    assert {f"ema.{n.replace('.', '__')}" for n in names} | {"ema.num_updates"} == {k for k in sd if k.startswith("ema.")}
    assert not any(n.startswith("ema.") for n in names)  # buffers: the optimizer never sees them
    w = model.blocks[0].attn.q_proj.weight
    w0 = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)
    model.after_optimizer_step()  # what the engine calls after optimizer.step()
    shadow = model.ema.shadow("blocks.0.attn.q_proj.weight")
    torch.testing.assert_close(shadow, w0 + 0.5)
    save_model(model, str(tmp_path / "m.safetensors"))  # the file format of model.safetensors
    assert int(load_file(str(tmp_path / "m.safetensors"))["ema.num_updates"]) == 1
    with model.ema_applied():
        torch.testing.assert_close(w, w0 + 0.5)
    torch.testing.assert_close(w, w0 + 1.0)  # the trained weights are back
    model.use_ema()
    torch.testing.assert_close(w, w0 + 0.5)
