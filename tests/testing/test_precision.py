"""Float32 checks on deep networks: rounding is not reported, a leak is (issue 17 item 7).

A 22-block pre-activation network in train mode, over a few visible sites, differs between a canvas
and a larger one by ~1e-3 of its scale in float32 and ~1e-12 in float64: rounding amplified by
normalisations over few values. The checks decide such a failed fp32 comparison in float64 (the
rounding witness), or, where no float64 copy can run, with a tolerance that grows with depth.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.testing import check_canvas_invariant, rounding_allowance, rounding_layers
from sparsify.testing._witness import _Witness
from tests.zoo.models import PreActBlock


class PreActNet(nn.Module):
    """22 pre-activation blocks (4, 6, 8, 4) at strides 4 to 32, ending on a norm-act."""

    def __init__(self, blocks=(4, 6, 8, 4), widths=(16, 32, 64, 128)):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, 2, 1)
        layers, cin = [], widths[0]
        for n, c in zip(blocks, widths):
            layers += [PreActBlock(cin if i == 0 else c, c, 2 if i == 0 else 1) for i in range(n)]
            cin = c
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)

    def forward(self, x):
        return F.relu(self.bn(self.blocks(self.stem(x))))


def _case(seed: int = 2):
    torch.manual_seed(seed)
    model = PreActNet()
    for m in model.modules():  # trained-looking norms: scales and shifts away from 1 and 0
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.2)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 64, 64, generator=g)
    mask = sparsify.random_mask(2, (2, 2), 0.85, generator=g)  # stride 32: one visible patch of four
    return model, x, mask, g


class Leaky(nn.Module):
    """A correct encoder plus a small leak: the mean of the whole input, masked garbage included."""

    def __init__(self, enc: nn.Module, amount: float):
        super().__init__()
        self.enc, self.amount = enc, amount

    def forward(self, x, mask=None):
        feats = self.enc(x, mask)
        return [f + self.amount * x.mean() * (f != 0) for f in feats]

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["enc"], name)


def _no_float64(monkeypatch):
    def unavailable(self):
        raise RuntimeError("no float64 kernel (simulated)")

    monkeypatch.setattr(_Witness, "twins", unavailable)


@pytest.fixture(scope="module")
def deep():
    model, x, mask, _ = _case()
    enc = sparsify.wrap(model, input_size=(64, 64))
    return model, enc, x, mask


def _canvas(enc, x, mask, **kwargs):
    # Padding at the top and left shifts every map, so the convolutions round differently: here
    # 1.2e-3 of the scale in float32 without the witness (measured on x86 CPU, one thread).
    g = torch.Generator().manual_seed(5)
    return check_canvas_invariant(enc, x, mask, pad=(2, 1, 0, 0), eval=False, generator=g, **kwargs)[0]


def test_deep_preact_rounding_is_not_a_failure_in_float32(deep):
    model, enc, x, mask = deep
    result = _canvas(enc, x, mask)
    assert result.passed, result.line()
    # The same check in float64: ~1e-12, so what float32 shows is rounding.
    enc64 = sparsify.wrap(copy.deepcopy(model).double(), input_size=(64, 64))
    exact = _canvas(enc64, x.double(), mask)
    assert exact.passed and exact.max_error <= 1e-9 * exact.scale, exact.line()


def test_deep_preact_passes_without_a_float64_twin(deep, monkeypatch):
    _, enc, x, mask = deep
    _no_float64(monkeypatch)
    result = _canvas(enc, x, mask)
    assert result.passed, result.line()


@pytest.mark.parametrize("twin", ["float64 twin", "no float64 twin"])
def test_a_leak_still_fails_in_float32(deep, monkeypatch, twin):
    _, enc, x, mask = deep
    if twin == "no float64 twin":
        _no_float64(monkeypatch)
    result = _canvas(Leaky(enc, 0.02), x, mask)
    assert not result.passed, result.line()
    assert ("fp64 twin" in result.tolerance) == (twin == "float64 twin")
    if twin == "no float64 twin":
        assert "tolerance scaled with depth" in result.detail and "allowance" in result.tolerance


def test_fixed_tolerances_when_the_witness_is_off(deep):
    _, enc, x, mask = deep
    result = _canvas(Leaky(enc, 0.02), x, mask, fp64_witness=False)
    assert not result.passed and "allowance" not in result.tolerance and "fp64" not in result.tolerance


def test_rounding_allowance_grows_with_the_square_root_of_depth():
    one = nn.Sequential(nn.Conv2d(3, 4, 3))
    four = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4))
    assert rounding_layers(one) == 1 and rounding_layers(four) == 4
    assert rounding_allowance(four, torch.float32) == pytest.approx(2 * rounding_allowance(one, torch.float32))
    assert rounding_allowance(four, torch.float64) == 0.0
    assert rounding_allowance(four, torch.float16) > rounding_allowance(four, torch.float32)
    assert rounding_allowance(four, torch.bfloat16) == 1e-2  # capped: beyond it a leak could hide
    shared = nn.Conv2d(4, 4, 3)
    assert rounding_layers(nn.Sequential(shared, shared)) == 1  # a module used twice counts once
    assert rounding_layers(PreActNet()) == 94
