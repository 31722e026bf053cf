"""collect_routing against hand counts, and write_pictures on a tiny model."""
import json
import math

import pytest
import torch
from torch import nn

from moh.analysis import collect_routing, write_pictures
from moh.config import MoHConfig
from moh.core.attention import MoHAttention
from moh.core.routing import Routing
from moh.models import create_model
from moh.models.base import ModelOutput


class FixedRouter(nn.Module):
    """Returns a routing set by the test (B, T, H active pattern, optional probs)."""

    def __init__(self, active_BTH, probs_BTE=None, num_shared=1):
        super().__init__()
        self.active, self.probs, self.num_shared = active_BTH, probs_BTE, num_shared

    def forward(self, x, raw_queries):
        return Routing(self.active.float(), self.active, self.probs, self.num_shared, learned=False)


class OneLayer(nn.Module):
    """A model with one MoHAttention; returns a ModelOutput with an optional token mask."""

    def __init__(self, router, token_mask=None):
        super().__init__()
        self.attn = MoHAttention(MoHConfig(dim=9, num_heads=3, num_shared=1, top_k=1, backend="masked"))
        self.attn.router = router
        self.token_mask = token_mask

    def forward(self, x, labels=None):
        out = self.attn(x)
        return ModelOutput(logits=out.output, routings=[out.routing], token_mask=self.token_mask)


def test_head_load_matches_hand_counts():
    # B=2 samples, T=3 tokens, H=3 heads (head 0 shared); rows are tokens
    active = torch.tensor([[[1, 1, 0], [1, 0, 1], [1, 1, 0]],
                           [[1, 0, 1], [1, 0, 1], [1, 1, 0]]], dtype=torch.bool)
    probs = torch.tensor([[[0.5, 0.5]] * 3, [[1.0, 0.0]] * 3])
    model = OneLayer(FixedRouter(active, probs))
    batch = {"x": torch.randn(2, 3, 9), "labels": torch.tensor([1, 0])}
    rec = collect_routing(model, [batch, batch], group_fn=lambda b: b["labels"], group_names=["zero", "one"])
    # group "one" = sample 0: head 1 used by 2 of 3 tokens, head 2 by 1 of 3; "zero" = sample 1
    want = torch.tensor([[[1.0, 1 / 3, 2 / 3], [1.0, 2 / 3, 1 / 3]]])
    torch.testing.assert_close(rec.head_load, want)
    torch.testing.assert_close(rec.routed_counts, torch.tensor([[12.0, 6.0, 6.0]], dtype=torch.float64))
    torch.testing.assert_close(rec.active_fraction, torch.tensor([24 / 36]))
    torch.testing.assert_close(rec.entropy, torch.tensor([math.log(2) / 2]))  # half the tokens uniform, half one-hot
    assert rec.batches == 2 and rec.group_names == ["zero", "one"]


def test_per_token_groups_ignore_and_padding():
    active = torch.tensor([[[1, 1, 0], [1, 0, 1], [1, 1, 0]]], dtype=torch.bool)
    mask = torch.tensor([[True, True, False]])  # last token is padding
    model = OneLayer(FixedRouter(active), token_mask=mask)
    groups = torch.tensor([[0, -1, 0]])  # token 1 ignored
    rec = collect_routing(model, [{"x": torch.randn(1, 3, 9)}], group_fn=lambda b: groups)
    # only token 0 counts: heads 0 and 1
    torch.testing.assert_close(rec.head_load, torch.tensor([[[1.0, 1.0, 0.0]]]))
    assert rec.group_names == ["0"]
    assert math.isnan(rec.entropy.item())  # no router probabilities


def test_collect_on_a_vit_matches_its_outputs_and_cleans_up():
    torch.manual_seed(0)
    model = create_model("moh-vit-tiny-50", depth=2, dim=32, num_heads=4, num_shared=1, top_k=2, image_size=8)
    model.train()
    images, labels = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 1, 2, 0, 1])
    rec = collect_routing(model, [{"images": images, "labels": labels}], group_fn=lambda b: b["labels"])
    assert model.training  # mode restored
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed
    model.eval()
    with torch.no_grad():
        routings = model(images=images).routings
    for l, r in enumerate(routings):
        for g in range(3):
            hand = r.active_BTH[labels == g].float().mean((0, 1))  # (H,) over the group's tokens
            torch.testing.assert_close(rec.head_load[l, g], hand)
        assert rec.active_fraction[l].item() == pytest.approx(0.75)
    assert rec.head_load.shape == (2, 3, 4)


def test_bad_group_ids_raise():
    model = OneLayer(FixedRouter(torch.ones(1, 3, 3, dtype=torch.bool)))
    batch = {"x": torch.randn(1, 3, 9)}
    with pytest.raises(ValueError, match="group id 5"):
        collect_routing(model, [batch], group_fn=lambda b: torch.tensor([5]), group_names=["a", "b"])
    with pytest.raises(ValueError, match="expected"):
        collect_routing(model, [batch], group_fn=lambda b: torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no MoHAttention"):
        collect_routing(nn.Linear(2, 2), [batch])


def test_write_pictures(tmp_path):
    torch.manual_seed(0)
    model = create_model("moh-vit-tiny-75", depth=2, dim=32, num_heads=4, num_shared=1, top_k=2, image_size=8)
    batches = [{"images": torch.randn(4, 1, 8, 8), "labels": torch.randint(0, 3, (4,))} for _ in range(3)]
    rec = collect_routing(model, batches, group_fn=lambda b: b["labels"], group_names=["a", "b", "c"], max_batches=2)
    assert rec.batches == 2
    paths = write_pictures(rec, tmp_path / "pics", title="tiny")
    pngs = [p for p in paths if p.suffix == ".png"]
    assert len(pngs) == 3  # a fixed top-k uses exactly its configured heads: active_fraction.png is skipped
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    summary = json.loads((tmp_path / "pics" / "routing_summary.json").read_text())
    assert summary["group_names"] == ["a", "b", "c"]
    assert torch.tensor(summary["head_load"]).shape == (2, 3, 4)
    assert summary["expected_active_fraction"] == [0.75, 0.75]
    assert list(summary["skipped"]) == ["active_fraction.png"]
