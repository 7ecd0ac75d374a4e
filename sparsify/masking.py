"""Random patch masks, drawn on the device without host synchronisation.

Convention everywhere in sparsify: a mask is a bool tensor of shape (B, 1, *grid) on the grid of the
coarsest feature map (one cell per image patch: (B, 1, h, w) for images, (B, 1, d, h, w) for volumes,
(B, 1, l) for signals), and True means *visible* ("active").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._geometry import per_axis
from .errors import SparsifyError

__all__ = ["random_mask", "num_visible", "check_mask"]


def num_visible(num_patches: int, ratio: float) -> int:
    """How many patches stay visible when ``ratio`` of ``num_patches`` are masked."""
    return int(round(num_patches * (1.0 - ratio)))


def random_mask(
    batch: int,
    size: Sequence[int] | int,
    ratio: float = 0.6,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw a random patch mask, True = visible.

    Every sample keeps exactly ``round(cells * (1 - ratio))`` visible patches (at least one), chosen
    uniformly at random. The draw happens on ``device`` (the generator's device when not given) with
    no host synchronisation, so it is safe inside a compiled or CUDA-graphed step.

    Args:
        batch: number of samples B.
        size: the patch grid, i.e. the input size divided by the downsample ratio per axis: ``(h, w)``
            for images, ``(d, h, w)`` for volumes, ``(l,)`` for signals; an int means a square grid.
        ratio: fraction of patches to mask, in [0, 1).
        generator: optional ``torch.Generator`` for reproducible masks.
        device: where to create the mask.

    Returns:
        bool tensor of shape (B, 1, *size).
    """
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    try:
        grid = tuple(int(s) for s in size)
    except TypeError:
        raise SparsifyError(f"random_mask needs the grid as a sequence of ints, got {size!r}") from None
    if batch < 1 or not grid or any(s < 1 for s in grid):
        raise SparsifyError(f"random_mask needs batch >= 1 and a non-empty grid, got batch={batch}, size={size}")
    if not 0.0 <= ratio < 1.0:
        raise SparsifyError(f"mask ratio must be in [0, 1), got {ratio}; 0.6 is the SparK default")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    num_patches = 1
    for s in grid:
        num_patches *= s
    keep = max(1, num_visible(num_patches, ratio))
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    # The `keep` smallest noise values per row are visible: rank via argsort, compare to keep.
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return (ranks < keep).view(batch, 1, *grid)


def check_mask(
    mask: torch.Tensor, batch: int, grid: Sequence[int], device: torch.device | None = None
) -> None:
    """Raise SparsifyError unless ``mask`` is a bool (B, 1, *grid) tensor for this batch and grid (on
    ``device`` when given: the input's)."""
    if not isinstance(mask, torch.Tensor):
        raise SparsifyError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.device.type == "meta" or (device is not None and mask.device != device):
        raise SparsifyError(
            f"mask is on device {mask.device} but the input is on {device}; "
            + ("a meta tensor has no values. " if mask.device.type == "meta" else "")
            + "Create the mask on the input's device (mask.to(x.device), or random_mask(..., device=x.device))"
        )
    if mask.dtype != torch.bool:
        raise SparsifyError(
            f"mask must be a bool tensor (True = visible), got dtype {mask.dtype}; use mask.bool() "
            "or sparsify.random_mask(...)"
        )
    grid = per_axis(tuple(grid), len(grid), "mask grid")
    expected = (batch, 1, *grid)
    if tuple(mask.shape) != expected:
        axes = {1: "L // R", 2: "H // R, W // R", 3: "D // R, H // R, W // R"}.get(len(grid), "*size // R")
        rank_note = (
            f"; it has {mask.dim() - 2} spatial dimensions where the input has {len(grid)}"
            if mask.dim() != len(expected) else ""
        )
        raise SparsifyError(
            f"mask has shape {tuple(mask.shape)} but this input needs {expected} "
            f"(batch, 1, {axes}){rank_note}; draw one with sparsify.random_mask({batch}, {grid})"
        )
