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
