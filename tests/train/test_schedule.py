import math

import pytest

from moh.train.schedule import lr_at


def lrs(total=11, warmup=3, lr=1.0, floor=0.1):
    return [lr_at(s, lr=lr, warmup_steps=warmup, total_steps=total, min_lr_ratio=floor) for s in range(total)]


def test_warmup_is_linear_from_lr_over_warmup():
    got = lrs()
    assert got[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_cosine_reaches_floor_at_last_step_and_midpoint_is_the_mean():
    got = lrs(total=11, warmup=3)
    assert got[3] == pytest.approx(1.0)  # decay starts at the peak
    assert got[-1] == pytest.approx(0.1)
    # decay over steps 3..10: the midpoint (step 6.5) is not a step, check step 5 against the formula
    assert got[5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 7)))
    assert all(a >= b for a, b in zip(got[3:], got[4:]))  # monotone after warmup


def test_no_warmup_starts_at_lr():
    assert lrs(total=5, warmup=0)[0] == pytest.approx(1.0)


def test_bad_step_raises():
    with pytest.raises(ValueError, match="step=-1"):
        lr_at(-1, lr=1.0, warmup_steps=0, total_steps=3, min_lr_ratio=0.1)
