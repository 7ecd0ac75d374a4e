"""The SparK loss and the plain masked MSE for 1-D and 3-D patches with per-axis sizes, against
explicit per-cell references."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsify.errors import SparsifyError
from sparsify.spark._patches import repeat_mask
from sparsify.spark.loss import masked_mse_loss, masked_patch_loss


def _cells(grid):
    return itertools.product(*(range(g) for g in grid))


def _block(x, cell, patch):
    return x[(slice(None),) + tuple(slice(g * p, (g + 1) * p) for g, p in zip(cell, patch))].reshape(-1)


def _reference(pred, target, mask, patch, normalise):
    """Cell by cell: each masked patch's values, normalised by their own mean and std (SparK) or not."""
    grid = mask.shape[2:]
    errs = []
    for i in range(target.shape[0]):
        for cell in _cells(grid):
            if mask[(i, 0, *cell)]:
                continue
            t, p = _block(target[i], cell, patch), _block(pred[i], cell, patch)
            if normalise:
                t = (t - t.mean()) / torch.sqrt(t.var(unbiased=True) + 1e-6)
            errs.append(((p - t) ** 2).mean())
    return torch.stack(errs).mean()


@st.composite
def _cases(draw):
    rank = draw(st.sampled_from([1, 3]))
    grid = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    patch = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    if all(p == 1 for p in patch):  # the unbiased variance of one value is undefined
        patch = (2,) + patch[1:]
    b, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    size = tuple(a * p for a, p in zip(grid, patch))
    target = torch.randn(b, c, *size, generator=g, dtype=torch.float64) * 2 + 1
    pred = torch.randn(b, c, *size, generator=g, dtype=torch.float64)
    mask = torch.rand(b, 1, *grid, generator=g) < 0.5
    mask[(0, 0) + (0,) * rank] = False  # something is masked
    return pred, target, mask, patch


@settings(max_examples=30, deadline=None)
@given(case=_cases())
def test_spark_loss_normalises_each_nd_patch_like_2d(case):
    pred, target, mask, patch = case
    got = masked_patch_loss(pred, target, mask, patch)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _reference(pred, target, mask, patch, normalise=True))


@settings(max_examples=30, deadline=None)
@given(case=_cases())
def test_mse_loss_is_the_plain_mean_over_masked_voxels(case):
    pred, target, mask, patch = case
    got = masked_mse_loss(pred, target, mask, patch)
    torch.testing.assert_close(got, _reference(pred, target, mask, patch, normalise=False))
    # also as a voxel-level formula: every channel of every masked voxel counts once
    masked = (~repeat_mask(mask, target.shape[2:])).expand_as(target)
    torch.testing.assert_close(got, ((pred - target)[masked] ** 2).mean())


@pytest.mark.parametrize("loss", [masked_patch_loss, masked_mse_loss])
def test_visible_voxels_do_not_count_in_3d(loss):
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 1, 4, 8, 8, generator=g)
    pred = torch.randn(2, 1, 4, 8, 8, generator=g)
    mask = torch.rand(2, 1, 2, 2, 2, generator=g) < 0.5
    mask[0, 0, 0, 0, 0] = False
    mask[1, 0, 1, 1, 1] = True
    visible = repeat_mask(mask, target.shape[2:])
    changed = torch.where(visible, pred + 100, pred)
    torch.testing.assert_close(loss(changed, target, mask, (2, 4, 4)), loss(pred, target, mask, (2, 4, 4)))
    assert not torch.allclose(loss(pred + 1, target, mask, (2, 4, 4)), loss(pred, target, mask, (2, 4, 4)))


def test_nd_loss_errors():
    x = torch.randn(1, 1, 4, 8, 8)
    with pytest.raises(SparsifyError, match=r"4x8x8 is not a multiple of the patch size 3x4x4"):
        masked_patch_loss(x, x, torch.zeros(1, 1, 1, 2, 2, dtype=torch.bool), (3, 4, 4))
    with pytest.raises(SparsifyError, match="does not match the patch grid"):
        masked_mse_loss(x, x, torch.zeros(1, 1, 2, 2, dtype=torch.bool), (2, 4, 4))
    with pytest.raises(SparsifyError, match="nothing is masked"):
        masked_mse_loss(x, x, torch.ones(1, 1, 2, 2, 2, dtype=torch.bool), (2, 4, 4))
