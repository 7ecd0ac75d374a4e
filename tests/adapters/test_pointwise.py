"""Site-wise rules: the output stays zero at masked sites iff f(0) == 0 and the inputs are zero.

Observable decision: an op that keeps zeros needs no mask multiply before the next convolution;
one that does not (sigmoid, exp, +1) gets exactly one. Either way the contract holds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ._helpers import TwoConv, check_contract, count_mask_multiplies, refusal

KEEPS_ZERO = {
    "nn.ReLU": nn.ReLU(), "nn.GELU": nn.GELU(), "nn.SiLU": nn.SiLU(), "nn.Hardswish": nn.Hardswish(),
    "nn.LeakyReLU": nn.LeakyReLU(0.1), "nn.Tanh": nn.Tanh(), "nn.Identity": nn.Identity(),
    "F.relu6": F.relu6, "torch.tanh": torch.tanh, ".relu()": lambda x: x.relu(),
    "clamp(-1, 1)": lambda x: x.clamp(-1, 1), "clamp_min(0)": lambda x: x.clamp_min(0),
    "x * 3": lambda x: x * 3, "x / 2": lambda x: x / 2, "-x": lambda x: -x, "x ** 2": lambda x: x ** 2,
    "x * sigmoid(x)": lambda x: x * torch.sigmoid(x), "x + x.abs()": lambda x: x + x.abs(),
    "cat channels": lambda x: torch.cat([x, x.square()], 1)[:, :3],
}
MAKES_DIRTY = {
    "nn.Sigmoid": nn.Sigmoid(), "torch.sigmoid": torch.sigmoid, "exp": lambda x: x.exp(),
    "x + 1": lambda x: x + 1, "clamp(0.5)": lambda x: x.clamp(min=0.5), "cos": torch.cos,
    "nn.Softplus": nn.Softplus(),
}


class _Affine(nn.Module):
    """A per-channel scale (keeps zeros), plus a per-channel shift (does not)."""

    def __init__(self, shift: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(1, 3, 1, 1) + 0.5)
        self.shift = nn.Parameter(torch.randn(1, 3, 1, 1)) if shift else None

    def forward(self, x):
        y = x * self.weight
        return y + self.shift if self.shift is not None else y


@pytest.mark.parametrize("shift", [False, True])
def test_per_channel_affine(shift, baseline):
    enc = check_contract(TwoConv(first=_Affine(shift)))
    assert count_mask_multiplies(enc) == baseline + shift


@pytest.fixture(scope="module")
def baseline() -> int:
    """Mask multiplies with no op on the input: the input's, one before c2, the stage output's."""
    return count_mask_multiplies(check_contract(TwoConv()))


@pytest.mark.parametrize("name", sorted(KEEPS_ZERO))
def test_zero_preserving_ops_need_no_mask(name, baseline):
    enc = check_contract(TwoConv(first=KEEPS_ZERO[name]))
    assert count_mask_multiplies(enc) == baseline


@pytest.mark.parametrize("name", sorted(MAKES_DIRTY))
def test_ops_with_nonzero_f0_get_one_mask_multiply(name, baseline):
    enc = check_contract(TwoConv(first=MAKES_DIRTY[name]))
    assert count_mask_multiplies(enc) == baseline + 1


def test_conv_sigmoid_conv_satisfies_the_contract():
    """The brief's example: sigmoid(0) = 0.5 at masked sites must not leak into the second conv."""
    check_contract(TwoConv(mid=nn.Sigmoid()), train=True)
    check_contract(TwoConv(mid=nn.Sigmoid()), train=False)


def test_softmax_over_channels_is_per_site_but_over_space_is_refused():
    check_contract(TwoConv(mid=lambda y: y.softmax(1)))
    message = refusal(TwoConv(mid=lambda y: y.softmax(-1)))
    assert "node 'softmax'" in message and "spatial" in message


def test_division_by_a_map_that_is_zero_at_masked_sites_is_refused():
    message = refusal(TwoConv(first=lambda x: x / x.abs()))
    assert "node 'truediv'" in message and "epsilon" in message
    check_contract(TwoConv(first=lambda x: x / (x.abs() + 1)))


class _ChannelsLastLinear(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.fc = nn.Linear(3, 3, bias=bias)

    def forward(self, x):
        return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("bias", [False, True])
def test_channels_last_linear_keeps_zero_only_without_bias(bias, baseline):
    enc = check_contract(TwoConv(first=_ChannelsLastLinear(bias)))
    assert count_mask_multiplies(enc) == baseline + bias
