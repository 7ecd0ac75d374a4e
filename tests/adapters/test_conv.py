"""Convolution rules: a convolution's input must be zero at masked sites (one mask multiply when it
is dirty); its output is dirty. This is what makes dense convs simulate sparse ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ._helpers import TwoConv, check_contract, count_mask_multiplies


def test_dirty_conv_input_gets_exactly_one_mask_multiply():
    """conv -> conv: one multiply between them (conv bias / active neighbours leak into masked
    sites); conv -> relu -> conv: still one; a zero input (the masked image): none."""
    enc = check_contract(TwoConv())
    assert count_mask_multiplies(enc) == 3  # input, before c2, stage output
    assert count_mask_multiplies(check_contract(TwoConv(mid=nn.ReLU()))) == 3


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.2)
        self.w2 = nn.Parameter(torch.randn(6, 2, 3, 3) * 0.2)
        self.b2 = nn.Parameter(torch.randn(6))

    def forward(self, x):
        y = F.conv2d(x, self.w1, None, 2, 1)
        return torch.conv2d(y.relu(), self.w2, self.b2, 2, 1, 1, 3)  # grouped


class _UpDown(nn.Module):
    """A transposed conv in the middle of the encoder (strides 2 -> 1 -> 2 -> 4)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, 2, 1)
        self.up = nn.ConvTranspose2d(6, 6, 2, 2)
        self.c2 = nn.Conv2d(6, 6, 3, 2, 1, dilation=1)
        self.c3 = nn.Conv2d(6, 6, 5, 2, 2, groups=6)
        self.c4 = nn.Conv2d(6, 6, 3, 2, 1)

    def forward(self, x):
        return self.c4(self.c3(self.c2(self.up(self.c1(x)))))


@pytest.mark.parametrize("make", [lambda: _Functional(), _UpDown, lambda: TwoConv(mid=nn.Conv2d(6, 6, 3, 1, 2, 2))],
                         ids=["functional", "transposed", "dilated"])
def test_conv_flavours_satisfy_the_contract(make):
    net = make()
    check_contract(net, in_chans=3 if isinstance(net, _Functional) else None)


def test_timm_same_padding_convs():
    conv2d_same = pytest.importorskip("timm.layers.conv2d_same")
    std_conv = pytest.importorskip("timm.layers.std_conv")
    check_contract(TwoConv(mid=conv2d_same.Conv2dSame(6, 6, 3, 1)))
    check_contract(TwoConv(mid=std_conv.StdConv2dSame(6, 6, 3, 1)))
