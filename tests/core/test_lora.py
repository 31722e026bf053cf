"""Projections that are not plain ``nn.Linear`` work through every backend: a PEFT LoRA adapter on
q/k/v/o gives the output of the merged weights (forward and backward), and the adapters' own
gradients agree between backends."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moh import BACKENDS, MoHAttention, MoHConfig

peft = pytest.importorskip("peft")  # in the test extra; importorskip only names the requirement

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class Wrapper(nn.Module):
    def __init__(self, attn: MoHAttention):
        super().__init__()
        self.attn = attn

    def forward(self, x, mask=None):
        return self.attn(x, mask).output


def layers(router: str, causal: bool):
    torch.manual_seed(0)
    cfg = MoHConfig(dim=24, num_heads=6, num_kv_heads=3, num_shared=1, top_k=2, router=router, causal=causal,
                    rope=True, qk_norm=True, qkv_bias=True, out_bias=True)
    base = Wrapper(MoHAttention(cfg))
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():  # lora_B starts at zero (adapter = no-op); make it matter
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    merged = copy.deepcopy(lora).merge_and_unload()  # plain nn.Linear with W + s * B A
    assert all(type(getattr(merged.attn, t)) is nn.Linear for t in TARGETS)
    assert not any(type(getattr(lora.base_model.model.attn, t)) is nn.Linear for t in TARGETS)
    return lora, merged


def run(model, backend, x, mask):
    for m in model.modules():
        if isinstance(m, MoHAttention):
            m.set_backend(backend)
    x = x.detach().clone().requires_grad_(True)
    out = model(x, mask)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "lora_" in n}
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("router", ["two_stage", "query_norm"])
@pytest.mark.parametrize("causal", [False, True])
def test_lora_equals_merged_weights_in_every_backend(router, causal):
    lora, merged = layers(router, causal)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 24, generator=gen)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :5] = False
    _, _, ref_lora_grads = run(lora, "reference", x, mask)
    assert ref_lora_grads and all(g.abs().sum() > 0 for g in ref_lora_grads.values())
    for backend in BACKENDS.names():
        out, dx, lora_grads = run(lora, backend, x, mask)
        want, want_dx, _ = run(merged, backend, x, mask)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5, msg=lambda s: f"{backend}: {s}")
        torch.testing.assert_close(dx, want_dx, atol=1e-4, rtol=1e-4, msg=lambda s: f"{backend} dx: {s}")
        for name, g in lora_grads.items():
            torch.testing.assert_close(g, ref_lora_grads[name], atol=1e-4, rtol=1e-4,
                                       msg=lambda s: f"{backend} d{name}: {s}")
