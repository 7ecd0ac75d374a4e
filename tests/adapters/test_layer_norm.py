"""Masked LayerNorm over (C, H, W) (and over (H, W)) == per-sample statistics of gathered active
entries; LayerNorm over channels alone stays per-site (no adapter)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from sparsify.adapters import masked_layer_norm, masked_layer_norm_fn
from torch import nn

from ._helpers import (
    SETTINGS,
    cases,
    check_contract,
    count_mask_multiplies,
    per_sample,
    reference_norm,
    refusal,
    stat_atol,
)

timm_layers = None
try:
    import timm.layers as timm_layers
except ImportError:  # timm is optional
    pass


def _module(shape, eps, affine, bias, seed):
    ln = nn.LayerNorm(shape, eps=eps, elementwise_affine=affine, bias=bias)
    if affine:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            ln.weight.copy_(torch.rand(shape, generator=gen) + 0.5)
            if bias:
                ln.bias.copy_(torch.randn(shape, generator=gen))
    return ln


params = dict(eps=st.sampled_from([1e-5, 1e-2]), affine=st.booleans(), bias=st.booleans(),
              over=st.sampled_from(["chw", "hw"]))


@SETTINGS
@given(case=cases(), **params)
def test_equals_gathered_reference(case, eps, affine, bias, over):
    """Over (C, H, W): one mean/var per sample over all channels at its active sites. Over (H, W):
    one per sample and channel. The elementwise weight/bias are read at the active sites."""
    b, c, h, w = case.x.shape
    shape = (c, h, w) if over == "chw" else (h, w)
    ln = _module(shape, eps, affine, bias, case.seed)
    y = masked_layer_norm(ln, case.x, case.mask)
    assert torch.equal(masked_layer_norm_fn(case.mask, case.x, shape, ln.weight, ln.bias, eps), y)
    for i in range(b):
        active = per_sample(case.x, case.mask, i)  # (C, n)
        if over == "chw":
            expected = reference_norm(active, eps)
            atol = stat_atol([active], eps)
        else:
            expected = torch.stack([reference_norm(row, eps) for row in active])
            atol = stat_atol(active, eps)
        keep = case.mask[i, 0].bool()
        if affine:
            weight = ln.weight.expand(c, h, w)[:, keep]
            expected = expected * weight + (ln.bias.expand(c, h, w)[:, keep] if bias else 0)
        torch.testing.assert_close(per_sample(y, case.mask, i), expected, rtol=1e-4, atol=atol)


@SETTINGS
@given(case=cases(), **params)
def test_no_mask_equals_plain_and_masked_sites_do_not_matter(case, eps, affine, bias, over):
    b, c, h, w = case.x.shape
    shape = (c, h, w) if over == "chw" else (h, w)
    ln = _module(shape, eps, affine, bias, case.seed)
    assert torch.equal(masked_layer_norm(ln, case.x, None), ln(case.x))
    assert torch.equal(masked_layer_norm_fn(None, case.x, shape, ln.weight, ln.bias, eps),
                       F.layer_norm(case.x, shape, ln.weight, ln.bias, eps))
    y = masked_layer_norm(ln, case.x, case.mask)
    y2 = masked_layer_norm(ln, case.garbage(), case.mask)
    keep = case.mask.bool().expand_as(y)
    assert torch.equal(y[keep], y2[keep])


class _ChannelsLastLN(nn.Module):
    """ConvNeXt style: permute to NHWC, LayerNorm over C (per site), Linear, permute back."""

    def __init__(self, timm_ln: bool = False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 4, 4)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.ln2d = timm_layers.LayerNorm2d(8) if timm_ln else None
        self.c2 = nn.Conv2d(8, 8, 2, 2)

    def forward(self, x):
        y = self.c1(x)
        y = self.fc(self.ln(y.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        if self.ln2d is not None:
            y = self.ln2d(y)
        return self.c2(y)


def test_layer_norm_over_channels_is_per_site():
    """Channels-last LayerNorm/Linear and timm's LayerNorm2d need no statistics over space: the
    wrapped net satisfies the contract, and the stage output gets one mask multiply (the biases
    make it dirty) besides the input's."""
    enc = check_contract(_ChannelsLastLN())
    # the stride-4 stage ends after the channels-last block, not at c1 before it
    assert [s.name for s in enc.stages] == ["permute_1", "c2"]
    assert count_mask_multiplies(enc) == 3  # input, the stride-4 stage (LN/Linear biases; c2 reads it), c2
    if timm_layers is not None:
        check_contract(_ChannelsLastLN(timm_ln=True))


class _RuntimeShapeLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 4, 4)
        self.c2 = nn.Conv2d(4, 4, 2, 2)

    def forward(self, x):
        y = self.c1(x)
        return self.c2(F.layer_norm(y, y.shape[1:]))


def test_runtime_normalized_shape_is_refused_by_name():
    message = refusal(_RuntimeShapeLN())
    assert "node 'layer_norm'" in message and "normalized_shape" in message
