"""Key/value cache for incremental decoding.

One ``KVCache`` per attention layer holds keys/values after qk-norm and RoPE in preallocated
buffers of shape (B, G, capacity, hd) that double when full, so a decode step costs no copy of
the past. ``LayerCaches`` bundles one per layer for a model.
"""
from __future__ import annotations

from torch import Tensor


class KVCache:
    def __init__(self, capacity: int = 256):
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0
        self._capacity = capacity

    def check(self, B: int, G: int, hd: int) -> None:
        """Raise (changing nothing) if keys of batch B, G heads, width hd cannot be appended."""
        if self.k is not None and (self.k.shape[0] != B or self.k.shape[1] != G or self.k.shape[3] != hd):
            raise ValueError(
                f"cache holds batch/heads/width {tuple(self.k.shape[i] for i in (0, 1, 3))}, "
                f"new keys have {(B, G, hd)}"
            )

    def update(self, k_BGTd: Tensor, v_BGTd: Tensor) -> tuple[Tensor, Tensor]:
        """Append T new positions; return views of all keys/values so far, (B, G, length, hd)."""
        B, G, T, hd = k_BGTd.shape
        self.check(B, G, hd)
        need = self.length + T
        if self.k is None:
            cap = max(self._capacity, need)
            self.k = k_BGTd.new_empty(B, G, cap, hd)
            self.v = v_BGTd.new_empty(B, G, cap, hd)
        elif need > self.k.shape[2]:
            cap = max(need, 2 * self.k.shape[2])
            k_new, v_new = self.k.new_empty(B, G, cap, hd), self.v.new_empty(B, G, cap, hd)
            k_new[:, :, : self.length] = self.k[:, :, : self.length]
            v_new[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = k_new, v_new
        # caches are for inference; detach so a cached graph never keeps old activations alive
        self.k[:, :, self.length : need] = k_BGTd.detach()
        self.v[:, :, self.length : need] = v_BGTd.detach()
        self.length = need
        return self.k[:, :, :need], self.v[:, :, :need]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search / dropping finished sequences)."""
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class LayerCaches(list):
    """One KVCache per layer."""

    def __init__(self, num_layers: int, capacity: int = 256):
        super().__init__(KVCache(capacity) for _ in range(num_layers))

    @property
    def length(self) -> int:
        return self[0].length if self else 0
