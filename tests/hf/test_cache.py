"""``LayerCache`` appends to transformers' DynamicLayer in place (no copy of the past per decode
step) and stays what ``DynamicLayer``'s own concatenation would hold through everything
transformers does to a cache: crop, beam reorder, repeat, reset, a dtype change; appends that need
gradients keep the graph."""
import torch
from transformers import DynamicCache

from moh.hf.cache import LayerCache


def _kv(B=2, G=3, T=1, hd=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, G, T, hd, generator=g), torch.randn(B, G, T, hd, generator=g)


def _two():
    """A DynamicCache fed through LayerCache and one fed by DynamicCache.update (the reference)."""
    return DynamicCache(), DynamicCache()


def _append(ours, ref, T, seed, layer=0):
    k, v = _kv(T=T, seed=seed)
    got = LayerCache(ours, layer).update(k, v)
    want = ref.update(k, v, layer)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(ours.layers[layer].keys, ref.layers[layer].keys, rtol=0, atol=0)
    assert ours.get_seq_length(layer) == ref.get_seq_length(layer)
    return got


def test_decode_steps_write_in_place_and_hold_what_cat_holds():
    ours, ref = _two()
    _append(ours, ref, T=5, seed=0)
    start = ours.layers[0].keys.data_ptr()
    for step in range(1, 40):
        keys, _ = _append(ours, ref, T=1, seed=step)
        assert keys.data_ptr() == start  # 5 + 128 positions of headroom: no reallocation yet
    # a long append reallocates (and copies what it held once)
    keys, _ = _append(ours, ref, T=200, seed=99)
    assert keys.shape[2] == 244 and keys.data_ptr() != start


def test_layers_are_created_as_the_cache_would():
    ours, ref = _two()
    _append(ours, ref, T=3, seed=0, layer=2)  # layers 0, 1 created empty, as Cache.update does
    assert len(ours.layers) == len(ref.layers) == 3 and ours.get_seq_length(0) == 0


def test_crop_then_append_overwrites_the_dropped_positions():
    ours, ref = _two()
    _append(ours, ref, T=6, seed=0)
    _append(ours, ref, T=1, seed=1)
    ours.crop(-3)
    ref.crop(-3)
    _append(ours, ref, T=2, seed=2)
    _append(ours, ref, T=1, seed=3)


def test_beam_reorder_repeat_and_select_are_adopted():
    ours, ref = _two()
    _append(ours, ref, T=4, seed=0)
    index = torch.tensor([1, 1])
    ours.reorder_cache(index)
    ref.reorder_cache(index)
    _append(ours, ref, T=1, seed=1)
    ours.batch_repeat_interleave(1)
    ref.batch_repeat_interleave(1)
    _append(ours, ref, T=1, seed=2)
    ours.reset()
    ref.reset()
    _append(ours, ref, T=3, seed=3)


def test_a_dtype_change_and_gradients_take_dynamic_layers_own_path():
    ours = DynamicCache()
    k, v = _kv(T=3)
    LayerCache(ours, 0).update(k, v)
    got, _ = LayerCache(ours, 0).update(*(t.double() for t in _kv(T=1, seed=1)))
    assert got.dtype == torch.float64 and got.shape[2] == 4  # torch.cat's promotion, as DynamicLayer
    grads = DynamicCache()
    k, v = _kv(T=2)
    k.requires_grad_(True)
    keys, _ = LayerCache(grads, 0).update(k, v)
    keys.sum().backward()
    assert k.grad is not None and torch.equal(k.grad, torch.ones_like(k))
