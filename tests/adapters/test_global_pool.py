"""Global pooling written with the whole map as kernel (``F.avg_pool2d(x, x.size()[2:])``) and the
image-pool branch broadcast back over the map (ASPP): the pooled value is the mean / max over the
gathered active sites, and the broadcast reaches visible sites only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify

from ._helpers import check_contract, patch_mask


class _WholeMapGate(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.c1 = nn.Conv2d(3, 5, 3, 2, 1)
        self.c2 = nn.Conv2d(5, 5, 3, 2, 1)

    def forward(self, x):
        y = self.c1(x)
        b, c = y.shape[:2]
        if self.how == "avg":
            g = F.avg_pool2d(y, y.size()[2:]).view(b, c)
        elif self.how == "avg_tuple":
            g = F.avg_pool2d(y, (y.size(2), y.size(3))).view(b, c)
        else:
            g = F.max_pool2d(y, y.shape[2:]).view(b, c)
        return self.c2(y * g.view(b, c, 1, 1))


def _gathered(y, mask, how):
    """(B, C) mean or max over each sample's active sites of y."""
    m = F.interpolate(mask.float(), size=y.shape[-2:], mode="nearest")[:, 0].bool()
    rows = [y[i][:, m[i]] for i in range(y.shape[0])]
    return torch.stack([r.amax(1) if how == "max" else r.mean(1) for r in rows])


@pytest.mark.parametrize("how", ["avg", "avg_tuple", "max"])
def test_whole_map_pool_equals_the_gathered_statistic(how):
    torch.manual_seed(0)
    model = _WholeMapGate(how)
    check_contract(model)
    enc = sparsify.wrap(model, (16, 24), stages=["mul", "c2"])  # the gated map as a stage
    x = torch.randn(2, 3, 16, 24)
    mask = patch_mask(2, (4, 6), seed=3)
    y_masked = model.c1(x * F.interpolate(mask.float(), size=(16, 24)))
    gate = _gathered(y_masked, mask, "max" if how == "max" else "avg")
    gated, _ = enc(x, mask)
    m = F.interpolate(mask.float(), size=gated.shape[-2:])
    expected = y_masked * gate[:, :, None, None] * m
    torch.testing.assert_close(gated, expected, rtol=1e-5, atol=1e-5)


class _ImagePool(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.c1 = nn.Conv2d(3, 4, 3, 2, 1)
        self.branch = nn.Conv2d(4, 4, 1)
        self.pool_conv = nn.Conv2d(4, 3, 1)
        self.c2 = nn.Conv2d(7, 4, 3, 2, 1)

    def forward(self, x):
        y = self.c1(x)
        p = self.pool_conv(F.adaptive_avg_pool2d(y, 1))
        if self.mode == "expand":
            p = p.expand(-1, -1, y.shape[2], y.shape[3])
        else:
            p = F.interpolate(p, size=y.shape[-2:], mode=self.mode,
                              align_corners=True if self.mode == "bilinear" else None)
        return self.c2(torch.cat([self.branch(y), p], 1))


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "expand"])
def test_image_pool_branch_is_the_masked_mean_broadcast_to_visible_sites(mode):
    torch.manual_seed(0)
    model = _ImagePool(mode)
    check_contract(model)
    enc = sparsify.wrap(model, (16, 24), stages=["cat", "c2"])
    x = torch.randn(2, 3, 16, 24)
    mask = patch_mask(2, (4, 6), seed=5)
    y_masked = model.c1(x * F.interpolate(mask.float(), size=(16, 24)))
    pooled = model.pool_conv(_gathered(y_masked, mask, "avg")[:, :, None, None])
    cat, _ = enc(x, mask)
    m = F.interpolate(mask.float(), size=cat.shape[-2:])
    torch.testing.assert_close(cat[:, 4:], pooled.expand(-1, -1, *cat.shape[-2:]) * m, rtol=1e-5, atol=1e-5)
