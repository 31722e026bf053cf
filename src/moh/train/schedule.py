"""Learning-rate schedule: linear warmup, then cosine decay to ``lr * min_lr_ratio``.

A pure function of the step, so the schedule's whole state is the step number (checkpoints
store nothing else for it).
"""
from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Warmup: lr * (step + 1) / warmup_steps for step < warmup_steps (the first step is not 0,
    which would waste it). Then cosine from lr at step ``warmup_steps`` to lr * min_lr_ratio at
    the last step ``total_steps - 1``.
    """
    if step < 0 or total_steps <= 0:
        raise ValueError(f"step={step} must be >= 0 and total_steps={total_steps} > 0")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
