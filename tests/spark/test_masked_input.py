"""Masked pixels are invisible to SparK even when they are NaN or Inf (select, not multiply)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sparsify
from sparsify.spark import SparK
from sparsify.spark._patches import repeat_mask
from sparsify.spark.model import hide_masked


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
    )  # fmt: skip


def _mask() -> torch.Tensor:
    m = torch.ones(2, 1, 4, 6, dtype=torch.bool)
    m[0, 0, 1, 2] = m[0, 0, 3, 5] = m[1, 0, 0, 0] = m[1, 0, 2, 3] = False
    return m


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("train", [True, False])
def test_non_finite_pixels_in_masked_patches_do_not_reach_the_prediction(bad, train):
    spark = SparK(sparsify.wrap(_net(), input_size=(32, 48)), decoder_width=16).train(train)
    x = torch.randn(2, 3, 32, 48)
    mask = _mask()
    pix = repeat_mask(mask, x.shape[-2:])
    poisoned = torch.where(pix, x, torch.full_like(x, bad))
    state = {k: v.clone() for k, v in spark.state_dict().items() if isinstance(v, torch.Tensor)}
    clean = spark.predict(hide_masked(x, mask), mask)
    spark.load_state_dict({**spark.state_dict(), **state})  # same running stats for both passes
    pred = spark.predict(poisoned, mask)
    assert torch.isfinite(pred).all()
    torch.testing.assert_close(pred, clean, rtol=0, atol=0)
    out = spark.eval().reconstruct(poisoned, mask)
    for key in ("masked", "reconstruction", "composite"):
        assert torch.isfinite(out[key]).all(), key


def test_finite_inputs_give_the_same_prediction_as_multiplying():
    spark = SparK(sparsify.wrap(_net(), input_size=(32, 48)), decoder_width=16).eval()
    x = torch.randn(2, 3, 32, 48)
    mask = _mask()
    pix = repeat_mask(mask, x.shape[-2:])
    torch.testing.assert_close(hide_masked(x, mask), x * pix, rtol=0, atol=0)
    torch.testing.assert_close(spark.predict(x, mask), spark.predict(x * pix, mask), rtol=0, atol=0)
