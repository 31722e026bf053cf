"""``moh.eval.num_threads``: what commands run in-process by tests use to keep their caller's setting."""
from __future__ import annotations

import pytest
import torch

from moh.eval import num_threads


def test_num_threads_sets_and_restores_even_on_error():
    before = torch.get_num_threads()
    target = 2 if before == 1 else 1
    try:
        with num_threads(target):
            assert torch.get_num_threads() == target
        assert torch.get_num_threads() == before
        with pytest.raises(RuntimeError, match="inside"):
            with num_threads(target):
                raise RuntimeError("inside")
        assert torch.get_num_threads() == before
        with num_threads(0), num_threads(None):  # 0 / None: leave the setting alone
            assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
