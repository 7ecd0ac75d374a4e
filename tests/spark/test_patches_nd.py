"""Patch geometry in 1-, 2- and 3-D with per-axis patches: patchify / unpatchify / repeat_mask / mask_at
against explicit slicing references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsify.errors import SparsifyError
from sparsify.spark._patches import mask_at, patchify, repeat_mask, unpatchify


@st.composite
def _layouts(draw):
    """(rank, per-axis grid, per-axis patch, channels, batch); at most a few hundred voxels."""
    rank = draw(st.integers(1, 3))
    grid = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    patch = tuple(draw(st.integers(1, 4)) for _ in range(rank))
    return rank, grid, patch, draw(st.integers(1, 3)), draw(st.integers(1, 2))


def _cell(x: torch.Tensor, cell: tuple[int, ...], patch: tuple[int, ...]) -> torch.Tensor:
    """The voxels of grid cell ``cell`` of x (C, *size), as (C, *patch)."""
    index = (slice(None),) + tuple(slice(g * p, (g + 1) * p) for g, p in zip(cell, patch))
    return x[index]


@settings(max_examples=40, deadline=None)
@given(layout=_layouts(), seed=st.integers(0, 10_000))
def test_patchify_puts_each_grid_cell_in_its_row_and_unpatchify_inverts(layout, seed):
    rank, grid, patch, c, b = layout
    size = tuple(g * p for g, p in zip(grid, patch))
    x = torch.randn(b, c, *size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    patches = patchify(x, patch)
    assert patches.shape == (b, math.prod(grid), math.prod(patch) * c)
    for i in range(b):
        for row, cell in enumerate(itertools.product(*(range(g) for g in grid))):  # row-major grid order
            want = _cell(x[i], cell, patch).movedim(0, -1).reshape(-1)  # voxel-major, channels last
            assert torch.equal(patches[i, row], want)
    assert torch.equal(unpatchify(patches, patch, c, grid), x)


def test_isotropic_int_patch_equals_per_axis_tuple():
    x = torch.randn(2, 3, 8, 12, 4)
    assert torch.equal(patchify(x, 4), patchify(x, (4, 4, 4)))
    assert torch.equal(unpatchify(patchify(x, 4), 4, 3, (2, 3, 1)), x)


@settings(max_examples=40, deadline=None)
@given(layout=_layouts(), seed=st.integers(0, 10_000))
def test_repeat_mask_equals_nearest_interpolation(layout, seed):
    rank, grid, patch, _, b = layout
    mask = torch.rand(b, 1, *grid, generator=torch.Generator().manual_seed(seed)) < 0.5
    size = tuple(g * p for g, p in zip(grid, patch))
    got = repeat_mask(mask, size)
    assert got.dtype == torch.bool and got.shape == (b, 1, *size)
    want = F.interpolate(mask.double(), size=size, mode="nearest") > 0.5
    assert torch.equal(got, want)


@settings(max_examples=40, deadline=None)
@given(layout=_layouts(), seed=st.integers(0, 10_000), data=st.data())
def test_mask_at_coarser_axes_is_any_visible_and_finer_axes_repeat(layout, seed, data):
    rank, grid, patch, _, b = layout
    # a fine mask grid (grid * patch) and a feature that is coarser (by `patch`) on some axes and
    # finer (by a factor 2) on the others
    fine_grid = tuple(g * p for g, p in zip(grid, patch))
    coarser = [data.draw(st.booleans()) for _ in range(rank)]
    size = tuple(g if c else f * 2 for g, f, c in zip(grid, fine_grid, coarser))
    mask = torch.rand(b, 1, *fine_grid, generator=torch.Generator().manual_seed(seed)) < 0.3
    got = mask_at(mask, size)
    assert got.dtype == torch.bool and got.shape == (b, 1, *size)
    # reference: max-pool the coarser axes by `patch`, then nearest-upsample the rest
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[rank]
    kernel = tuple(p if c else 1 for p, c in zip(patch, coarser))
    want = F.interpolate(pool(mask.double(), kernel, kernel), size=size, mode="nearest") > 0.5
    assert torch.equal(got, want)
    assert torch.equal(mask_at(mask.double(), size), want.double())  # 0/1 floats keep their dtype


def test_mask_errors_name_the_problem():
    mask = torch.ones(1, 1, 2, 3, dtype=torch.bool)
    with pytest.raises(SparsifyError, match="2-D mask .* 3-D size"):
        repeat_mask(mask, (4, 6, 2))
    with pytest.raises(SparsifyError, match="whole multiple"):
        repeat_mask(mask, (4, 7))
    with pytest.raises(SparsifyError, match="whole fraction"):
        mask_at(torch.ones(1, 1, 4, 6, dtype=torch.bool), (3, 6))
