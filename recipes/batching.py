"""Batch planning: the global batch, the per-device micro-batch that fits, and the accumulation between them.

A preset either asks for a global batch (``paper``: 4096) or leaves it to the machine (``default``: one
micro-batch per device). The micro-batch is the most images one device holds for a forward and backward
pass: probed on CUDA by trying the real SparK step at decreasing sizes, a fixed cap elsewhere (host
memory is rarely the limit on CPU; speed is). Accumulation makes up the difference.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from .cli import RecipeError

__all__ = ["BatchPlan", "plan_batches", "largest_fitting", "CPU_MICRO_BATCH", "DISTRIBUTED_MICRO_BATCH", "PROBE_LIMIT"]

#: micro-batch cap on devices that are not probed (CPU, MPS)
CPU_MICRO_BATCH = 32
#: the largest micro-batch the CUDA probe tries
PROBE_LIMIT = 512
#: micro-batch per GPU under torchrun when --micro-batch is not given (the probe is single-process only)
DISTRIBUTED_MICRO_BATCH = 64


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How one optimiser step is assembled."""

    global_batch: int  # images per optimiser step, all processes
    micro_batch: int  # images per device per forward/backward
    accum: int  # micro-steps per optimiser step

    def describe(self, world_size: int) -> str:
        if self.accum == 1:
            return f"batch {self.global_batch}"
        procs = f" x {world_size} processes" if world_size > 1 else ""
        return f"batch {self.global_batch} ({self.micro_batch}{procs} x {self.accum} accumulated micro-steps)"


def plan_batches(
    global_batch: int | None,
    world_size: int,
    dataset_len: int,
    micro_cap: Callable[[int], int],
    micro_batch: int | None = None,
    accum: int | None = None,
) -> BatchPlan:
    """Work out (global batch, micro-batch, accumulation).

    Args:
        global_batch: the requested global batch, or ``None`` for one micro-batch per device.
        world_size: processes.
        dataset_len: images in the data (an automatic global batch never exceeds it).
        micro_cap: ``upper -> the largest micro-batch <= upper that fits`` (called only when needed).
        micro_batch: an explicit micro-batch (``--micro-batch``).
        accum: an explicit accumulation count (``--accum``).
    """
    if global_batch is None:
        per_rank = max(1, dataset_len // world_size)
        if accum is not None:
            micro = micro_batch or micro_cap(max(1, per_rank // accum))
            micro = max(1, min(micro, per_rank // accum or 1))
            return BatchPlan(micro * world_size * accum, micro, accum)
        micro = min(micro_batch or micro_cap(per_rank), per_rank)
        return BatchPlan(micro * world_size, micro, 1)
    if global_batch % world_size:
        raise RecipeError(
            f"--batch-size {global_batch} is not divisible by the {world_size} processes; use a multiple of "
            f"{world_size}"
        )
    per_rank = global_batch // world_size
    if accum is None:
        cap = micro_batch if micro_batch is not None else micro_cap(per_rank)
        accum = math.ceil(per_rank / max(1, min(cap, per_rank)))
        while per_rank % accum:  # micro-batches of equal size: the next divisor of the per-rank batch
            accum += 1
    elif per_rank % accum:
        raise RecipeError(
            f"--batch-size {global_batch} must be divisible by processes x --accum = {world_size} x {accum}"
        )
    return BatchPlan(global_batch, per_rank // accum, accum)


def largest_fitting(fits: Callable[[int], bool], upper: int) -> int:
    """The largest size <= ``upper`` for which ``fits(size)`` holds, trying ``upper`` then halving.

    Raises:
        RecipeError: when not even one image fits.
    """
    size = max(1, int(upper))
    while size >= 1:
        if fits(size):
            return size
        size //= 2
    raise RecipeError(
        "not even one image fits in device memory for a SparK step; use a smaller --input-size, a smaller "
        "--decoder-width, --precision bf16, or a smaller model"
    )
