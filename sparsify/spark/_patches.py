"""Patch geometry shared by the SparK model, its loss and its pictures, for any spatial rank (private).

A mask is (B, 1, *grid) with one cell per patch; images are (B, C, *size) with size = grid * patch on
every axis. The patch is an int (the same on every axis) or one int per axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._geometry import Geometry, per_axis
from ..errors import SparsifyError

__all__ = ["repeat_mask", "mask_at", "patchify", "unpatchify"]


def _sizes(size: Sequence[int] | torch.Size) -> tuple[int, ...]:
    return tuple(int(s) for s in size)


def repeat_mask(mask: torch.Tensor, size: Sequence[int] | torch.Size) -> torch.Tensor:
    """Repeat a (B, 1, *grid) mask to ``size`` by nearest-neighbour repetition (any dtype, bool kept).

    ``size`` must be a whole multiple of the grid on every axis.
    """
    b, c, *grid = mask.shape
    out = _sizes(size)
    if len(out) != len(grid):
        raise SparsifyError(
            f"cannot repeat a {len(grid)}-D mask {tuple(mask.shape)} to the {len(out)}-D size {out}; "
            "the mask needs one grid axis per spatial axis of the input"
        )
    if out == tuple(grid):
        return mask
    if any(o % g for o, g in zip(out, grid)):
        raise SparsifyError(
            f"cannot repeat a {Geometry.describe(grid)} mask to {Geometry.describe(out)}: the feature map must "
            "be a whole multiple of the mask grid (check that the input size is a multiple of the downsample "
            "ratio)"
        )
    view, expand = [b, c], [b, c]
    for g, o in zip(grid, out):
        view += [g, 1]
        expand += [g, o // g]
    return mask.view(view).expand(expand).reshape(b, c, *out)


def mask_at(mask: torch.Tensor, size: Sequence[int] | torch.Size) -> torch.Tensor:
    """The (B, 1, *grid) mask at a feature map's spatial ``size``, per axis.

    On an axis where the map is finer than the grid each cell is repeated; where it is coarser (a
    stage coarser than a mask patch finer than the downsample ratio) a map cell is visible when any
    of the patches it covers is visible, the rule under which the encoder keeps its features zero at
    masked sites. Bool masks stay bool; 0/1 float masks stay float.
    """
    b, c, *grid = mask.shape
    out = _sizes(size)
    if len(out) != len(grid):
        return repeat_mask(mask, out)  # raises the rank error
    if all(o >= g for o, g in zip(out, grid)):
        return repeat_mask(mask, out)
    if any(o < g and g % o for o, g in zip(out, grid)):
        raise SparsifyError(
            f"cannot reduce a {Geometry.describe(grid)} mask to {Geometry.describe(out)}: on every axis the "
            "feature map must be a whole multiple or a whole fraction of the mask grid"
        )
    shape, pooled = [b, c], []
    for g, o in zip(grid, out):
        if o < g:
            shape += [o, g // o]
            pooled.append(len(shape) - 1)
        else:
            shape += [g]
    grouped = mask.reshape(shape)
    coarse = grouped.any(dim=tuple(pooled)) if mask.dtype == torch.bool else grouped.amax(dim=tuple(pooled))
    return repeat_mask(coarse, out)


def patchify(x: torch.Tensor, patch: int | Sequence[int]) -> torch.Tensor:
    """(B, C, *size) -> (B, L, prod(patch) * C): patches in row-major grid order, voxel-major within
    (channels last), e.g. (B, C, H, W) -> (B, gh * gw, ph * pw * C)."""
    b, c, *size = x.shape
    rank = len(size)
    p = per_axis(patch, rank, "patch size")
    grid = [s // q for s, q in zip(size, p)]
    split = [b, c]
    for g, q in zip(grid, p):
        split += [g, q]
    order = [0, *(2 + 2 * i for i in range(rank)), *(3 + 2 * i for i in range(rank)), 1]
    return x.reshape(split).permute(order).reshape(b, math.prod(grid), math.prod(p) * c)


def unpatchify(
    patches: torch.Tensor, patch: int | Sequence[int], channels: int, grid: Sequence[int]
) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, prod(patch) * C) -> (B, C, *(grid * patch))."""
    b = patches.shape[0]
    grid = _sizes(grid)
    rank = len(grid)
    p = per_axis(patch, rank, "patch size")
    x = patches.reshape(b, *grid, *p, channels)
    order = [0, 2 * rank + 1]
    for i in range(rank):
        order += [1 + i, 1 + rank + i]
    return x.permute(order).reshape(b, channels, *(g * q for g, q in zip(grid, p)))
