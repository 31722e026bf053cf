"""MoH-DiT: shapes, adaLN-Zero start, the `all` router as plain MHA, backends, presets, metrics."""
import copy

import pytest
import torch
from torch import nn

from moh.core.attention import MoHAttention, MoHOutput, set_backend
from moh.core.routing import Routing
from moh.models import create_model, list_models, model_config
from moh.models.dit import DiT

TINY = dict(dim=32, depth=2, num_heads=4, image_size=8, patch_size=2, num_classes=4, in_chans=2)
MOH_TINY = dict(TINY, layer_heads=[[1, 2], [4, 0]])


def randomize_modulation(model: DiT, seed: int = 0) -> DiT:
    """Non-zero adaLN and final weights: at init they are 0 and would hide the attention."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name or name.startswith("final."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def test_shapes_loss_and_metrics():
    torch.manual_seed(0)
    model = create_model("moh-dit-tiny-90", **MOH_TINY)
    x, y = torch.randn(6, 2, 8, 8), torch.randint(0, 4, (6,))
    out = model(x, y)
    assert out.logits is None and out.task_loss.shape == () and len(out.routings) == 2
    assert out.loss.item() == pytest.approx((out.task_loss + 0.01 * out.aux_loss).item(), rel=1e-6)
    eps, routings = model.denoise(x, torch.tensor([0, 1, 10, 100, 500, 999]), y)
    assert eps.shape == x.shape and routings[0].gates_BTH.shape == (6, 16, 4)
    buckets = {k: v for k, v in out.metrics.items() if k.startswith("mse_t")}
    assert list(buckets) == ["mse_t0-249", "mse_t250-499", "mse_t500-749", "mse_t750-999"]
    assert sum(int(c) for _, c in buckets.values()) == 6
    assert sum(float(s) for s, _ in buckets.values()) / 6 == pytest.approx(out.task_loss.item(), rel=1e-5)
    assert out.metrics["heads_active"][0] / 6 == pytest.approx((3 / 4 + 1) / 2)
    assert model(x).task_loss.shape == ()  # no labels: the null class (unconditional)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 2, 8, 8\), got \(6, 1, 8, 8\)"):
        model(torch.randn(6, 1, 8, 8), y)
    with pytest.raises(ValueError, match="class label 5 is not in"):
        model.denoise(x, torch.zeros(6, dtype=torch.long), torch.tensor([0, 1, 2, 3, 4, 5]))


def test_adaln_zero_starts_as_identity():
    torch.manual_seed(0)
    model = create_model("moh-dit-tiny-90", **MOH_TINY)
    x = torch.randn(3, 16, 32)
    cond = torch.randn(3, 32)
    for blk in model.blocks:
        assert torch.equal(blk(x, cond=cond)[0], x)  # every gate 0
    eps = model.predict_noise(torch.randn(3, 2, 8, 8), torch.tensor([1, 50, 900]), torch.tensor([0, 1, 4]))
    assert torch.equal(eps, torch.zeros_like(eps))  # zero final layer: predicts no noise


class PlainMHA(nn.Module):
    """torch's nn.MultiheadAttention with the weights of an MoHAttention layer."""

    def __init__(self, attn: MoHAttention):
        super().__init__()
        D, H = attn.cfg.dim, attn.cfg.num_heads
        self.mha = nn.MultiheadAttention(D, H, bias=True, batch_first=True)
        with torch.no_grad():
            self.mha.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
            self.mha.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
            self.mha.out_proj.weight.copy_(attn.o_proj.weight)
            self.mha.out_proj.bias.copy_(attn.o_proj.bias)
        self.H = H

    def forward(self, x, attention_mask=None, cache=None, positions=None):
        y = self.mha(x, x, x, need_weights=False)[0]
        B, T, _ = x.shape
        ones = torch.ones(B, T, self.H, dtype=torch.bool)
        return MoHOutput(y, Routing(ones.float(), ones, None, num_shared=self.H))


@pytest.mark.parametrize("backend", ["reference", "masked", "sparse"])
def test_all_router_dit_equals_plain_multi_head_attention(backend):
    torch.manual_seed(0)
    model = randomize_modulation(create_model("dit-tiny-mha", backend=backend, **TINY)).eval()
    plain = copy.deepcopy(model)
    for blk in plain.blocks:
        blk.attn = PlainMHA(blk.attn)
    x, t, y = torch.randn(5, 2, 8, 8), torch.tensor([0, 3, 100, 500, 999]), torch.tensor([0, 1, 2, 3, 4])
    with torch.no_grad():
        torch.testing.assert_close(model.predict_noise(x, t, y), plain.predict_noise(x, t, y), atol=1e-5, rtol=1e-5)


def test_backends_agree_on_per_layer_head_counts():
    """Layers with their own head counts (the paper's XL/2 layout, in small): outputs and gradients."""
    torch.manual_seed(0)
    kw = dict(TINY, depth=3, num_heads=4, head_dim=8, layer_heads=[[2, 2, 0], [4, 1, 2], [6, 2, 2]])
    model = randomize_modulation(create_model("moh-dit-tiny-90", **kw))
    assert [b.attn.cfg.num_heads for b in model.blocks] == [2, 4, 6]
    assert model.blocks[2].attn.q_proj.weight.shape == (48, 32)
    x, t, y = torch.randn(4, 2, 8, 8), torch.tensor([0, 10, 400, 999]), torch.tensor([0, 1, 2, 4])
    results = {}
    for backend in ("reference", "masked", "sparse"):
        set_backend(model, backend)
        model.zero_grad()
        eps = model.predict_noise(x, t, y)
        eps.square().sum().backward()
        results[backend] = (eps.detach(), model.blocks[1].attn.q_proj.weight.grad.clone())
    for backend in ("masked", "sparse"):
        torch.testing.assert_close(results[backend][0], results["reference"][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(results[backend][1], results["reference"][1], atol=1e-4, rtol=1e-4)


def test_label_dropout_only_while_training():
    torch.manual_seed(0)
    model = randomize_modulation(create_model("dit-tiny-mha", class_dropout=0.5, **TINY))
    x, y = torch.randn(64, 2, 8, 8), torch.randint(0, 4, (64,))
    labels_seen = []
    model.y_embedder.register_forward_hook(lambda m, args, out: labels_seen.append(args[0].clone()))
    torch.manual_seed(1)
    model.train()(x, y)
    torch.manual_seed(1)
    model.eval()(x, y)
    dropped, kept = labels_seen
    assert 10 < int((dropped == 4).sum()) < 54 and torch.equal(dropped[dropped != 4], y[dropped != 4])
    assert torch.equal(kept, y)


def test_paper_presets_head_layouts():
    names = set(list_models())
    for size in ("tiny", "tiny32", "s2", "b2", "l2", "xl2"):
        assert {f"dit-{size}-mha", f"moh-dit-{size}-90", f"moh-dit-{size}-75"} <= names
    expected = {"s2": (64, 54, 72), "b2": (129, 108, 144), "l2": (344, 288, 384), "xl2": (403, 336, 448),
                "tiny": (43, 36, 48)}
    for size, (h90, h75, total) in expected.items():
        for name, used in ((f"moh-dit-{size}-90", h90), (f"moh-dit-{size}-75", h75), (f"dit-{size}-mha", total)):
            atts = model_config(name).attention_configs()
            assert sum(a.active_heads for a in atts) == used, name
            assert sum(a.num_heads for a in atts) == total, name
    xl = model_config("moh-dit-xl2-90").attention_configs()
    assert [a.num_heads for a in xl] == [8] * 9 + [16] * 10 + [24] * 9
    assert {a.head_dim for a in xl} == {72} and xl[-1].num_shared == 16 and xl[-1].top_k == 3
    s90 = model_config("moh-dit-s2-90").attention_configs()
    assert [(a.num_shared, a.top_k) for a in s90] == [(3, 2)] * 8 + [(6, 0)] * 4  # routes in 8 of 12 layers
    cfg = model_config("dit-s2-mha")
    assert (cfg.image_size, cfg.in_chans, cfg.patch_size, cfg.dim, cfg.num_classes) == (32, 4, 2, 384, 1000)


def test_image_size_not_divisible_by_patch_size():
    with pytest.raises(ValueError, match="image_size=30 is not divisible by patch_size=4"):
        create_model("dit-tiny-mha", image_size=30)
    with pytest.raises(ValueError, match="class_dropout=1.0"):
        create_model("dit-tiny-mha", class_dropout=1.0)
