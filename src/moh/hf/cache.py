"""transformers' caches (``DynamicCache`` and the other ``Cache`` classes) as MoHAttention's cache.

``MoHAttention`` takes any object with ``.length``, ``.check(B, G, hd)`` and
``.update(k_BGTd, v_BGTd) -> (k_all, v_all)`` (the protocol of ``moh.core.cache.KVCache``).
``LayerCache(cache, layer_idx)`` is one layer of a transformers ``Cache`` seen through it, so
``generate()`` (greedy, sampling, beam search: ``Cache.reorder_cache`` reorders it) keeps its own
cache object and MoHAttention reads and appends to it.

Shape legend: B batch, G key/value heads, T new positions, S all positions, hd head width.
"""
from __future__ import annotations

from torch import Tensor
from transformers import Cache


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
        return self.cache.update(k_BGTd, v_BGTd, self.layer_idx)


__all__ = ["LayerCache"]
