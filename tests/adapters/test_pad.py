"""Padding rules: zero padding keeps absent sites absent; reflect / replicate / circular / non-zero
constant padding invent values next to the border and are refused with the node's name."""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from torch import nn

from ._helpers import TwoConv, check_contract, refusal


class _PadConv(nn.Module):
    def __init__(self, pad):
        super().__init__()
        self.pad = pad
        self.conv = nn.Conv2d(6, 6, 3)  # no padding of its own: back to the padded input's size

    def forward(self, y):
        return self.conv(self.pad(y))


@pytest.mark.parametrize("pad", [lambda y: F.pad(y, (1, 1, 1, 1)), lambda y: F.pad(y, [1, 1, 1, 1], "constant", 0.0),
                                 nn.ZeroPad2d(1), nn.ConstantPad2d(1, 0.0)],
                         ids=["F.pad", "F.pad value 0", "ZeroPad2d", "ConstantPad2d(0)"])
def test_zero_padding_satisfies_the_contract(pad):
    check_contract(TwoConv(mid=_PadConv(pad)))


@pytest.mark.parametrize("pad, node", [
    (lambda y: F.pad(y, (1, 1, 1, 1), mode="reflect"), "pad"),
    (lambda y: F.pad(y, (1, 1, 1, 1), mode="replicate"), "pad"),
    (lambda y: F.pad(y, (1, 1, 1, 1), mode="circular"), "pad"),
    (lambda y: F.pad(y, (1, 1, 1, 1), value=1.0), "pad"),
    (nn.ConstantPad2d(1, 0.5), "mid.pad"),
    (nn.ReflectionPad2d(1), "mid.pad"),
], ids=["reflect", "replicate", "circular", "value 1", "ConstantPad2d(0.5)", "ReflectionPad2d"])
def test_non_zero_padding_is_refused_by_name(pad, node):
    message = refusal(TwoConv(mid=_PadConv(pad)))
    assert "padding" in message or "no adapter" in message
    assert f"'{node}'" in message


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv_padding_mode_other_than_zeros_is_refused(mode):
    message = refusal(TwoConv(mid=nn.Conv2d(6, 6, 3, 1, 1, padding_mode=mode)))
    assert "node 'mid'" in message and f"padding_mode={mode!r}" in message


class _PadPool(nn.Module):
    """A "same"-padding stem step: explicit zero pad, then an unpadded strided pool."""

    def __init__(self, pad, pool):
        super().__init__()
        self.pad = pad
        self.pool = pool

    def forward(self, y):
        return self.pool(self.pad(y))


@pytest.mark.parametrize("pad", [nn.ZeroPad2d((0, 1, 0, 1)), nn.ConstantPad2d(1, 0.0),
                                 lambda y: F.pad(y, (1, 1, 1, 1))],
                         ids=["ZeroPad2d(0,1,0,1)", "ConstantPad2d", "F.pad"])
@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, 2), nn.AvgPool2d(3, 2), lambda y: F.max_pool2d(y, 3, 2)],
                         ids=["MaxPool2d", "AvgPool2d", "F.max_pool2d"])
def test_zero_pad_then_pool_lands_back_on_the_grid(pad, pool):
    # The conv output before the pad is signed (no activation), so the pad's zeros can win a max:
    # masked sites must behave exactly like them for a masked canvas to match the image alone.
    check_contract(TwoConv(mid=_PadPool(pad, pool), mid_out=6), input_size=(32, 48))


def test_pool_after_a_pad_that_excludes_its_own_padding_is_refused():
    pool = nn.AvgPool2d(4, 2, 1, count_include_pad=False)
    message = refusal(TwoConv(mid=_PadPool(nn.ZeroPad2d((0, 1, 0, 1)), pool)), input_size=(32, 48))
    assert "'mid.pool'" in message and "excludes its own padding" in message


def test_negative_padding_is_refused():
    message = refusal(TwoConv(mid=lambda y: F.pad(F.pad(y, (-1, -1, -1, -1)), (1, 1, 1, 1))))
    assert "node 'pad'" in message and "crops" in message
