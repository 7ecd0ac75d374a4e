"""sparsify.register_adapter: a custom layer that was refused wraps, once registered, and satisfies
the contract (kind="statistic", "mixing", "pointwise"). Each test registers its own classes: the
registry is global."""

from __future__ import annotations

import pytest
import torch
from sparsify.adapters import masked_moments
from torch import nn

import sparsify

from ._helpers import TwoConv, check_contract, count_mask_multiplies, refusal


class _ToyNorm(nn.Module):
    """Per-sample, per-channel normalisation over space (nanmean has no built-in rule)."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        mean = x.mean((2, 3), keepdim=True)
        var = (x - mean).square().nanmean((2, 3), keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * self.weight[:, None, None]


def _masked_toy_norm(module, x, mask):
    if mask is None:
        return module(x)
    mean, var, _ = masked_moments(x, mask, (2, 3))
    return (x - mean) / torch.sqrt(var + 1e-5) * module.weight[:, None, None]


class _ToyNormA(_ToyNorm):
    pass


class _ToyNormB(_ToyNorm):
    pass


def test_statistic_adapter_makes_a_refused_net_wrap():
    message = refusal(TwoConv(mid=_ToyNormA()))
    assert "node 'nanmean'" in message and "in module 'mid'" in message and "no adapter" in message
    sparsify.register_adapter(_ToyNormA, _masked_toy_norm, kind="statistic")
    enc = check_contract(TwoConv(mid=_ToyNormA()))
    assert any(n.target is _masked_toy_norm for n in enc.graph.nodes)


def test_statistic_adapter_as_decorator():
    assert "node 'nanmean'" in refusal(TwoConv(mid=_ToyNormB()))

    @sparsify.register_adapter(_ToyNormB)
    def masked(module, x, mask):
        return _masked_toy_norm(module, x, mask)

    assert callable(masked)
    check_contract(TwoConv(mid=_ToyNormB()))


class _StdGate(nn.Module):
    """A global statistic: the per-channel standard deviation over space, shape (B, C)."""

    def forward(self, x):  # x.std((2, 3)) written out (nansum has no built-in rule)
        return ((x - x.mean((2, 3), keepdim=True)).square().nansum((2, 3)) / (x.shape[2] * x.shape[3] - 1)).sqrt()


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.stat = _StdGate()

    def forward(self, y):
        return y * torch.sigmoid(self.stat(y))[:, :, None, None]


def test_statistic_adapter_with_global_output():
    assert "node 'nansum': method .nansum() in module 'mid.stat'" in refusal(TwoConv(mid=_Gated()))

    def masked_std(module, x, mask):
        if mask is None:
            return module(x)
        _, var, n = masked_moments(x, mask, (2, 3))
        return (var * n / (n - 1).clamp_min(1)).sqrt().flatten(1)

    sparsify.register_adapter(_StdGate, masked_std, kind="statistic", global_output=True)
    check_contract(TwoConv(mid=_Gated()))


class _DownCumsum(nn.Module):
    """Running sum down the rows: reads only sites above (x.cumsum has no built-in rule)."""

    def forward(self, x):
        return x.cumsum(2) * 0.1


class _DownCumsumMasked(_DownCumsum):
    pass


def test_mixing_adapter_zeroes_its_input():
    """kind='mixing': the input is zeroed at masked sites before the op (the conv output is dirty),
    the output is dirty; with the registration the net is canvas invariant."""
    assert "node 'cumsum'" in refusal(TwoConv(mid=_DownCumsum()))
    sparsify.register_adapter(_DownCumsum, kind="mixing")
    enc = check_contract(TwoConv(mid=_DownCumsum()))
    assert count_mask_multiplies(enc) == 4  # input, before mid, before c2, stage output


def test_mixing_adapter_with_a_masked_implementation():
    calls = []

    def masked(module, x, mask):
        calls.append(mask is None)
        return module(x)

    sparsify.register_adapter(_DownCumsumMasked, masked, kind="mixing")
    check_contract(TwoConv(mid=_DownCumsumMasked()))
    assert calls and not all(calls)  # called with a mask, and with None for mask=None


class _CumsumChannels(nn.Module):  # per site, but no rule knows it
    def forward(self, x):
        return torch.cumsum(x, 1)


class _CumsumChannelsPlusOne(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, 1) + 1


@pytest.mark.parametrize("cls, preserves_zero", [(_CumsumChannels, True), (_CumsumChannelsPlusOne, False)])
def test_pointwise_adapter(cls, preserves_zero):
    """kind='pointwise': f(0) == 0 keeps the masked input zero (no multiply before c1);
    otherwise one multiply is added."""
    assert "node 'cumsum'" in refusal(TwoConv(first=cls()))
    sparsify.register_adapter(cls, kind="pointwise", preserves_zero=preserves_zero)
    base = count_mask_multiplies(check_contract(TwoConv()))
    enc = check_contract(TwoConv(first=cls()))
    assert count_mask_multiplies(enc) == base + (not preserves_zero)


def test_unknown_kind_is_an_error():
    with pytest.raises(sparsify.SparsifyError, match="kind"):
        sparsify.register_adapter(_ToyNorm, kind="global")
