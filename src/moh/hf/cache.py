"""transformers' caches (``DynamicCache`` and the other ``Cache`` classes) as MoHAttention's cache.

``MoHAttention`` takes any object with ``.length``, ``.check(B, G, hd)`` and
``.update(k_BGTd, v_BGTd) -> (k_all, v_all)`` (the protocol of ``moh.core.cache.KVCache``).
``LayerCache(cache, layer_idx)`` is one layer of a transformers ``Cache`` seen through it, so
``generate()`` (greedy, sampling, beam search: ``Cache.reorder_cache`` reorders it) keeps its own
cache object and MoHAttention reads and appends to it.

A plain ``DynamicLayer`` appends by ``torch.cat``: every decode step copies the whole cache of
every layer (at a 4k context that copy was half of a decode step of LLM-S on one CPU thread).
``LayerCache`` appends to such a layer in place instead: the layer's ``keys`` / ``values`` become
views of buffers with room to grow (25% headroom, at least 128 positions), reallocated only when
full, so a step writes one row. Everything transformers does with the layer keeps working, since
its ``keys`` / ``values`` are still the (B, G, S, hd) tensors of the cached positions: crop
shortens the views (the next append writes over the dropped positions), and reorder / repeat /
select / offload replace them with new tensors, which the next append notices (they are no
longer views of the buffers) and adopts. Other layer kinds (sliding window, static, quantized,
offloaded caches) and appends that need gradients go through the cache's own ``update``.

Shape legend: B batch, G key/value heads, T new positions, S all positions, hd head width.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

HEADROOM_MIN = 128  # positions of room a reallocation leaves at least


class LayerCache:
    """Layer ``layer_idx`` of a transformers ``Cache``, with moh's cache protocol."""

    def __init__(self, cache: Cache, layer_idx: int):
        if not isinstance(cache, Cache):
            raise ValueError(f"past_key_values must be a transformers Cache (e.g. DynamicCache), got "
                             f"{type(cache).__name__}; tuple caches are not supported")
        self.cache, self.layer_idx = cache, layer_idx

    @property
    def length(self) -> int:
        """Positions cached so far in this layer."""
        return self.cache.get_seq_length(self.layer_idx) if self.layer_idx < len(self.cache.layers) else 0

    def check(self, B: int, G: int, hd: int) -> None:
        """Raise (changing nothing) if keys of batch B, G heads, width hd cannot be appended."""
        if self.layer_idx >= len(self.cache.layers):
            return
        keys = getattr(self.cache.layers[self.layer_idx], "keys", None)
        if isinstance(keys, Tensor) and keys.dim() == 4 and keys.numel():
            have = (keys.shape[0], keys.shape[1], keys.shape[3])
            if have != (B, G, hd):
                raise ValueError(f"past_key_values layer {self.layer_idx} holds batch/heads/width {have}, "
                                 f"new keys have {(B, G, hd)}")

    def update(self, k_BGTd: Tensor, v_BGTd: Tensor) -> tuple[Tensor, Tensor]:
        """Append T new positions; all keys/values so far, (B, G, S, hd)."""
        layer = self._growable_layer(k_BGTd, v_BGTd)
        if layer is None:
            return self.cache.update(k_BGTd, v_BGTd, self.layer_idx)
        return append_in_place(layer, k_BGTd, v_BGTd)

    def _growable_layer(self, k: Tensor, v: Tensor):
        """The plain ``DynamicLayer`` to append to in place, or None for the cache's own update."""
        cache = self.cache
        if not isinstance(cache, DynamicCache) or getattr(cache, "offloading", False):
            return None
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            return None  # in-place writes would cut the graph the cat keeps
        if getattr(cache, "layer_class_to_replicate", None) is not None:
            while len(cache.layers) <= self.layer_idx:  # as Cache.update grows its layers
                cache.layers.append(cache.layer_class_to_replicate())
        if self.layer_idx >= len(cache.layers):
            return None
        layer = cache.layers[self.layer_idx]
        return layer if type(layer) is DynamicLayer else None


def _is_view_of(t: Tensor, buf: Tensor) -> bool:
    """``t`` is ``buf[:, :, :S]`` for some S (same storage start, strides, batch, heads, width, dtype)."""
    return (t.dim() == 4 and t.data_ptr() == buf.data_ptr() and t.stride() == buf.stride() and t.dtype == buf.dtype
            and t.device == buf.device and t.shape[:2] == buf.shape[:2] and t.shape[3] == buf.shape[3])


def append_in_place(layer: DynamicLayer, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Append ``k``, ``v`` (B, G, T, hd) to a ``DynamicLayer`` without copying what it holds
    (but on a reallocation); its ``keys`` / ``values`` become views of the buffers. Returns them."""
    if not layer.is_initialized:
        layer.lazy_initialization(k, v)
    keys, values = layer.keys, layer.values
    S = keys.shape[-2] if keys.numel() else 0
    if S and (keys.dtype != k.dtype or values.dtype != v.dtype or keys.device != k.device):
        layer.keys, layer.values = torch.cat([keys, k], dim=-2), torch.cat([values, v], dim=-2)
        return layer.keys, layer.values  # as DynamicLayer (a dtype change: its promotion rules)
    need = S + k.shape[2]
    buffers = getattr(layer, "_moh_buffers", None)
    fits = (buffers is not None and need <= buffers[0].shape[2] and
            (S == 0 or (_is_view_of(keys, buffers[0]) and _is_view_of(values, buffers[1]))) and
            buffers[0].shape[:2] == k.shape[:2] and buffers[0].dtype == k.dtype and buffers[0].device == k.device)
    if not fits:
        cap = max(need + HEADROOM_MIN, need * 5 // 4)
        B, G, _, hd = k.shape
        bk, bv = k.new_empty(B, G, cap, hd), v.new_empty(B, G, cap, v.shape[3])
        if S:
            bk[:, :, :S] = keys
            bv[:, :, :S] = values
        layer._moh_buffers = buffers = (bk, bv)
    bk, bv = buffers
    bk[:, :, S:need] = k.detach()
    bv[:, :, S:need] = v.detach()
    layer.keys, layer.values = bk[:, :, :need], bv[:, :, :need]
    return layer.keys, layer.values


__all__ = ["LayerCache", "append_in_place"]
