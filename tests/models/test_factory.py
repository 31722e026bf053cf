"""Presets and their overrides: every bad name or value is one ValueError naming it, before any
weight exists; no override is silently ignored or silently changes the active-head fraction."""
import pytest

import moh
from moh.models import create_model, model_config


@pytest.mark.parametrize("name", [5, None, ["moh-vit-tiny-50"]])
def test_a_name_that_is_not_a_string_is_named(name):
    with pytest.raises(ValueError, match="model name must be a string"):
        create_model(name)


def test_an_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="moh-vit-tiny-50"):
        create_model("moh-vit-tiny-51")


@pytest.mark.parametrize("preset", ["moh-vit-tiny-50", "moh-dit-tiny-90"])
@pytest.mark.parametrize("override, named", [
    (dict(dim=-1), "dim=-1"), (dict(dim=0), "dim=0"), (dict(image_size=0), "image_size=0"),
    (dict(patch_size=0), "patch_size=0"), (dict(patch_size=5), "not divisible"), (dict(in_chans=0), "in_chans=0"),
    (dict(num_classes=0), "num_classes=0"), (dict(mlp_ratio=0), "mlp_ratio"), (dict(depth=0), "depth=0"),
    (dict(attn_dropout=1.0), "attn_dropout"),
])
def test_out_of_range_sizes_are_named(preset, override, named):
    with pytest.raises(ValueError, match=named):
        model_config(preset, **override)


def test_a_head_count_override_that_changes_the_fraction_is_an_error():
    assert model_config("moh-vit-tiny-50").attention_configs()[0].active_heads == 4  # 2 shared + top-2 of 8
    with pytest.raises(ValueError, match="from 50% to 100%"):
        model_config("moh-vit-tiny-50", num_heads=4)
    cfg = model_config("moh-vit-tiny-50", num_heads=4, num_shared=1, top_k=1)  # said explicitly: fine
    assert cfg.attention_configs()[0].active_heads == 2


def test_a_split_override_on_a_per_layer_preset_is_not_ignored():
    assert model_config("moh-dit-tiny-90").layer_heads is not None
    with pytest.raises(ValueError, match="override layer_heads instead"):
        model_config("moh-dit-tiny-90", top_k=1)
    cfg = model_config("moh-dit-tiny-90", layer_heads=None, num_shared=2, top_k=2)
    assert {a.active_heads for a in cfg.attention_configs()} == {4}


def test_every_preset_builds_its_config():
    for name in moh.list_models():
        model_config(name).attention_configs()
