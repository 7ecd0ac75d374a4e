"""Tensors without per-site values next to feature maps: pooled vectors, their broadcasts (expand,
repeat) and uniform fresh tensors pass; a tensor that varies over space (a fixed map) is refused
(issue 8, 1.3; the refusals of whole networks are in tests/zoo/test_refusals.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ._helpers import TwoConv, check_contract, refusal

ACCEPTED = {
    "pooled + x": lambda y: y + y.mean((2, 3), keepdim=True),
    "expand_as(pooled) * x": lambda y: y * torch.sigmoid(y.amax((2, 3), keepdim=True)).expand_as(y),
    "repeat(pooled) + x": lambda y: y + y.mean((2, 3), keepdim=True).repeat(1, 1, y.shape[2], y.shape[3]),
    "cat(x, expand(pooled))": lambda y: torch.cat([y, y.mean((2, 3), keepdim=True).expand_as(y)], 1)[:, :6],
    "zeros(y.shape) + x": lambda y: torch.zeros(y.shape, dtype=y.dtype) + y,
    "x * per-channel buffer": lambda y: y * torch.ones(1, 6, 1, 1),
}
REFUSED = {
    "x + coordinate row": lambda y: y + torch.linspace(0.0, 1.0, y.shape[2]).view(1, 1, -1, 1),
    "x * arange map": lambda y: y * torch.arange(y.shape[3], dtype=y.dtype),
    "x + interpolated parameter": lambda y: y + F.interpolate(torch.ones(1, 6, 2, 2), size=y.shape[-2:]),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_values_uniform_over_space_are_accepted(name):
    check_contract(TwoConv(mid=ACCEPTED[name]))


@pytest.mark.parametrize("name", list(REFUSED))
def test_fixed_maps_are_refused_with_the_node_named(name):
    message = refusal(TwoConv(mid=REFUSED[name]))
    assert "fixed map" in message and "node '" in message
