"""Per-step schedules: learning-rate warm-up then cosine decay; weight decay cosine 0.04 -> 0.2.

Both are pure functions of the optimiser step, so the scheduler's "state" in a checkpoint is just
the step number.
"""

from __future__ import annotations

import math

__all__ = ["lr_at", "wd_at", "peak_lr"]


def peak_lr(base_lr: float, batch: int, rule: str = "linear", min_lr: float = 0.0) -> float:
    """Peak learning rate for global batch ``batch``: ``base_lr`` is the value at batch 256.

    ``"linear"``: ``base_lr * batch / 256`` (the SparK paper: 2e-4 gives 3.2e-3 at 4096). ``"sqrt"``:
    ``base_lr * sqrt(batch / 256)``; with 8e-4 (the paper's peak square-root scaled to 256) it matches the
    paper at 4096. Either is raised to at least ``min_lr``: at batch 16 the linear rule gives 1.25e-5 and
    the square-root rule 2e-4, with which LAMB moves the loss only slowly (measured in the README).
    """
    if rule == "linear":
        lr = base_lr * batch / 256.0
    elif rule == "sqrt":
        lr = base_lr * math.sqrt(batch / 256.0)
    else:
        raise ValueError(f"unknown learning-rate rule {rule!r}; use 'linear' or 'sqrt'")
    return max(lr, min_lr)


def lr_at(
    step: int,
    total_steps: int,
    peak_lr: float,
    warmup_steps: int,
    start_factor: float = 0.005,
    end_factor: float = 0.001,
) -> float:
    """Learning rate for optimiser step ``step`` (0-based).

    Linear warm-up from ``start_factor * peak`` to ``peak`` over ``warmup_steps``, then cosine decay to
    ``end_factor * peak`` at ``total_steps`` (the SparK recipe: 0.5% and 0.1% of the peak).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (start_factor + (1.0 - start_factor) * step / warmup_steps)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    end = end_factor * peak_lr
    return end + (peak_lr - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wd_at(step: int, total_steps: int, start: float = 0.04, end: float = 0.2) -> float:
    """Weight decay for step ``step``: half-cosine from ``start`` at step 0 to ``end`` at ``total_steps``."""
    progress = min(1.0, max(0.0, step / max(1, total_steps)))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
