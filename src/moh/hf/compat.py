"""What differs between the transformers 5.x releases moh supports.

transformers 5.24 renamed the KV cache from ``past_key_values`` to ``cache`` in every model's
``forward()`` and output (the old name still works there, with a deprecation warning).
``CACHE_NAME`` is the name the installed release uses; moh's models accept both names as
arguments and store the cache in their outputs under ``CACHE_NAME`` (``out.past_key_values``
reads it on every release).
"""
from __future__ import annotations

from typing import Any

from transformers.utils import ModelOutput

#: the KV cache's name in forward() arguments and model outputs of the installed transformers
CACHE_NAME = "cache" if isinstance(getattr(ModelOutput, "past_key_values", None), property) else "past_key_values"


def pick_cache(cache: Any, past_key_values: Any) -> Any:
    """The cache given under either name; both at once is an error."""
    if cache is not None and past_key_values is not None:
        raise ValueError("give the KV cache as `cache` or `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def output_cache(out: ModelOutput) -> Any:
    """A model output's KV cache, whatever the installed release calls it."""
    return getattr(out, CACHE_NAME)


__all__ = ["CACHE_NAME", "pick_cache", "output_cache"]
