"""Evaluation: metrics, benchmarks (``moh bench`` lives in ``moh.eval.bench``)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


@contextlib.contextmanager
def num_threads(n: Optional[int]) -> Iterator[None]:
    """torch's CPU threads set to ``n`` inside the block (left as they are for None or 0) and
    restored after it: commands that tests also run in-process keep their caller's setting."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
