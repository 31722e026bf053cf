"""DiT routing analysis: timestep ranges, noised batches, per-(class, range) counts and marginals."""
import pytest
import torch
from torch.utils.data import DataLoader

from moh.analysis.dit import collect_dit_routing, marginal, noised_batches, timestep_ranges
from moh.data.synthetic import RandomImages
from moh.models import create_model

TINY = dict(dim=32, depth=2, num_heads=4, image_size=8, patch_size=2, num_classes=4, layer_heads=[[1, 2], [4, 0]])


def test_timestep_ranges():
    assert timestep_ranges(1000, 4) == [(0, 249), (250, 499), (500, 749), (750, 999)]
    assert timestep_ranges(10, 3) == [(0, 2), (3, 5), (6, 9)]
    with pytest.raises(ValueError, match="timestep ranges=0"):
        timestep_ranges(1000, 0)


def test_noised_batches_cover_every_range_reproducibly():
    data = RandomImages("test", size=10, image_size=8, in_chans=1, num_classes=4)
    ranges = timestep_ranges(1000, 4)
    a = list(noised_batches(DataLoader(data, batch_size=3), ranges, seed=0))
    b = list(noised_batches(DataLoader(data, batch_size=3), ranges, seed=0))
    r = torch.cat([x["range"] for x in a])
    t = torch.cat([x["t"] for x in a])
    assert r.tolist() == [i % 4 for i in range(10)]
    assert all(ranges[ri][0] <= ti <= ranges[ri][1] for ri, ti in zip(r.tolist(), t.tolist()))
    assert all(torch.equal(x["noise"], y["noise"]) and torch.equal(x["t"], y["t"]) for x, y in zip(a, b))


def test_counts_per_class_and_range_and_their_marginals():
    torch.manual_seed(0)
    model = create_model("moh-dit-tiny-90", **TINY).eval()
    data = RandomImages("test", size=32, image_size=8, in_chans=1, num_classes=4)
    ranges = timestep_ranges(1000, 4)
    rec = collect_dit_routing(model, DataLoader(data, batch_size=16), ["a", "b", "c", "d"], ranges)
    assert rec.active_LGH.shape == (2, 16, 4) and rec.group_names[1] == "a|t250-499"
    by_class = marginal(rec, 4, 4, "range", ["a", "b", "c", "d"])
    by_t = marginal(rec, 4, 4, "class", ["t0", "t1", "t2", "t3"])
    counts = torch.bincount(data.labels, minlength=4).double() * 16  # 16 tokens per image
    assert torch.equal(by_class.tokens_LG[0], counts)
    assert by_t.tokens_LG[0].tolist() == [8 * 16] * 4  # 32 images, range i mod 4
    assert torch.allclose(by_class.active_LGH.sum(1), by_t.active_LGH.sum(1))
    assert by_t.head_load[0, :, 0].tolist() == [1.0] * 4  # the shared head: every token
    assert by_t.head_load[1].min().item() == 1.0  # the last layer uses every head
    torch.testing.assert_close(by_t.active_fraction, torch.tensor([0.75, 1.0]))
