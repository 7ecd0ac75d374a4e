"""Interpolation: nearest upsampling copies sites (zero input -> zero output, no mask multiply after
it); bilinear / area interpolation is the weighted mean over the active sites it reads (canvas
invariant even at the image border, where plain bilinear repeats the last row); bicubic and
align_corners=True are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from sparsify.adapters.interpolate import masked_interpolate
from torch import nn

from ._helpers import SETTINGS, TwoConv, cases, check_contract, count_mask_multiplies, refusal


@SETTINGS
@given(case=cases(min_hw=2, max_hw=5), scale=st.sampled_from([2, 3, (2, 3), 0.5]),
       mode=st.sampled_from(["bilinear", "area"]))
def test_weighted_modes_equal_normalised_gathered_weights(case, scale, mode):
    """Each output is sum_active(w * x) / sum_active(w) with w the interpolation weights of the
    active input sites, found by interpolating one-hot maps; mask=None is plain interpolation."""
    kwargs = dict(scale_factor=scale, mode=mode)
    if mode == "bilinear":
        kwargs["align_corners"] = False
    y = masked_interpolate(case.mask, case.x, **kwargs)
    b, c, h, w = case.x.shape
    eye = torch.eye(h * w).view(h * w, 1, h, w)
    weights = F.interpolate(eye, **kwargs)[:, 0]  # (h*w, H', W'): weight of input site k per output
    for i in range(b):
        active = case.mask[i, 0].flatten().bool()
        wts = weights[active]  # gathered active sites only
        num = torch.einsum("kpq,ck->cpq", wts, case.x[i].flatten(1)[:, active])
        den = wts.sum(0)
        expected = torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))
        # An output whose only active weights are rounding noise of the sample coordinates (~1e-8 at
        # scale 3) is 0 / 0 up to rounding: either answer is right there, so it is not compared.
        decided = ((den == 0) | (den > 1e-6)).expand_as(expected)
        torch.testing.assert_close(y[i][decided], expected[decided], rtol=1e-4, atol=1e-5)
    assert torch.equal(masked_interpolate(None, case.x, **kwargs), F.interpolate(case.x, **kwargs))
    torch.testing.assert_close(masked_interpolate(case.mask, case.garbage(), **kwargs), y, rtol=0, atol=0)


class _DownUp(nn.Module):
    """x + up(max_pool(x)): the pool's output is dirty, so up's input gets one mask multiply."""

    def __init__(self, up):
        super().__init__()
        self.up = up

    def forward(self, x):
        return x + self.up(F.max_pool2d(x, 2))


def _down_up(up):
    return _DownUp(up)


NEAREST = {
    "F.interpolate nearest": lambda t: F.interpolate(t, scale_factor=2),
    "nn.Upsample nearest": nn.Upsample(scale_factor=2),
    "nn.UpsamplingNearest2d": nn.UpsamplingNearest2d(scale_factor=2),
}
WEIGHTED = {
    "F.interpolate bilinear": lambda t: F.interpolate(t, scale_factor=2, mode="bilinear"),
    "nn.Upsample bilinear": nn.Upsample(scale_factor=2, mode="bilinear"),
    "F.interpolate area": lambda t: F.interpolate(t, scale_factor=2, mode="area"),
}


@pytest.fixture(scope="module")
def base() -> int:
    return count_mask_multiplies(check_contract(TwoConv()))


@pytest.mark.parametrize("name", sorted(NEAREST))
def test_nearest_upsampling_keeps_zero(name, base):
    enc = check_contract(TwoConv(first=_down_up(NEAREST[name])))
    assert count_mask_multiplies(enc) == base + 1  # the pool's output only


@pytest.mark.parametrize("name", sorted(WEIGHTED))
def test_weighted_upsampling_is_canvas_invariant(name, base):
    """The masked interpolation reads the pool's output through the mask itself (no multiply
    before it); its output is dirty, so the sum feeding c1 gets one."""
    enc = check_contract(TwoConv(first=_down_up(WEIGHTED[name])))
    assert count_mask_multiplies(enc) == base + 1


@pytest.mark.parametrize("up, reason", [
    (lambda t: F.interpolate(t, scale_factor=2, mode="bicubic"), "bicubic"),
    (lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True), "align_corners"),
    (nn.UpsamplingBilinear2d(scale_factor=2), "align_corners"),
], ids=["bicubic", "align_corners", "UpsamplingBilinear2d"])
def test_unsupported_interpolation_is_refused_by_name(up, reason):
    message = refusal(TwoConv(first=_down_up(up)))
    assert reason in message and ("node 'interpolate'" in message or "node 'first_up'" in message)
