"""DiT embeddings: patch layout, sin-cos positions, timestep features, null-class labels."""
import math

import pytest
import torch

from moh.layers.embed import (LabelEmbedder, check_patch_grid, sincos_pos_embed_2d, timestep_frequencies,
                              unpatchify)


def test_unpatchify_inverts_patch_order():
    B, C, p, h, w = 2, 3, 2, 3, 4
    x = torch.randn(B, C, h * p, w * p)
    # patch (i, j) as one token: values ordered (row in patch, column in patch, channel)
    tokens = x.view(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, p * p * C)
    assert torch.equal(unpatchify(tokens, p, C, h, w), x)
    with pytest.raises(ValueError, match="does not fit a 3x3 grid"):
        unpatchify(tokens, p, C, 3, 3)


def test_patch_grid_errors_name_the_values():
    assert check_patch_grid(28, 4) == 7
    with pytest.raises(ValueError, match="image_size=28 is not divisible by patch_size=3"):
        check_patch_grid(28, 3)
    with pytest.raises(ValueError, match="patch_size=0"):
        check_patch_grid(28, 0)


def test_sincos_positions_and_timestep_features():
    pe = sincos_pos_embed_2d(8, 2, 3)  # (T, D): rows in the first half, columns in the second
    assert pe.shape == (6, 8)
    assert torch.equal(pe[0, :4], pe[1, :4]) and not torch.equal(pe[0, 4:], pe[1, 4:])  # same row
    assert torch.equal(pe[0, 4:], pe[3, 4:])  # same column
    f = timestep_frequencies(torch.tensor([0, 5]), 6)
    assert f.shape == (2, 6) and torch.equal(f[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    assert f[1, 0].item() == pytest.approx(math.cos(5.0))


def test_label_dropout_and_null_class():
    emb = LabelEmbedder(3, 4)
    labels = torch.tensor([0, 1, 2] * 100)
    torch.manual_seed(0)
    dropped = emb.drop(labels, 0.3)
    frac = (dropped == 3).float().mean().item()
    assert 0.2 < frac < 0.4 and torch.equal(dropped[dropped != 3], labels[dropped != 3])
    assert torch.equal(emb.drop(labels, 0.0), labels)
    assert emb(torch.tensor([3])).shape == (1, 4)  # the null class has an embedding
    with pytest.raises(ValueError, match="class label 4 is not in"):
        emb(torch.tensor([0, 4]))
