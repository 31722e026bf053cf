"""RotaryEmbedding.cos_sin reuses its last factors only for the same, unmodified positions tensor
and equal frequencies (the layers of one forward), and recomputes otherwise."""
import torch

from moh.layers.rope import RotaryEmbedding


def test_factors_are_shared_by_layers_alike_and_only_by_them():
    a, b, other = RotaryEmbedding(8), RotaryEmbedding(8), RotaryEmbedding(8, theta=500.0)
    pos = torch.arange(5)[None]
    ca = a.cos_sin(pos, torch.float32)
    assert b.cos_sin(pos, torch.float32)[0] is ca[0]  # the same forward's next layer: no new work
    co = other.cos_sin(pos, torch.float32)
    assert not torch.equal(co[0], ca[0])
    torch.testing.assert_close(co[0], other._cos_sin(pos, torch.float32)[0], rtol=0, atol=0)
    fresh = a.cos_sin(pos, torch.float32)  # after another layer's entry: recomputed, same values
    torch.testing.assert_close(fresh[0], ca[0], rtol=0, atol=0)
    assert a.cos_sin(pos.clone(), torch.float32)[0] is not fresh[0]  # another tensor
    pos.add_(3)  # the same tensor changed in place: new factors
    torch.testing.assert_close(a.cos_sin(pos, torch.float32)[1], a._cos_sin(torch.arange(3, 8)[None], torch.float32)[1])
    assert a.cos_sin(pos, torch.float64)[0].dtype == torch.float64
    with torch.inference_mode():
        p = torch.arange(4)[None]
        assert a.cos_sin(p, torch.float32)[0] is b.cos_sin(p, torch.float32)[0]
