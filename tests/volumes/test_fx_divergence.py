"""Models whose torch.fx trace computes something else than their eager forward must not be accepted.

MONAI's ``UpCat`` (BasicUNet's decoder step) concatenates the encoder skip only
``if x_e is not None and torch.jit.isinstance(x_e, torch.Tensor)``. During symbolic tracing ``x_e`` is
an ``fx.Proxy``, not a ``torch.Tensor``, so the check is False and fx records the other branch: the
skip concatenation is silently dropped. In BasicUNet the convolution after it then gets half its input
channels, and running the traced graph fails; ``wrap`` must refuse (it runs the graph on an example).

Where the dropped branch leaves every shape intact, only a comparison with the model's own outputs can
tell: ``wrap`` runs the model and its graph once on the example input and refuses a graph that computes
something else, wherever the check sits (a module hook would not see a branch dropped in the model's own
``forward`` when the model returns its pyramid).
"""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn as nn
from monai.networks import nets as monai_nets

import sparsify


def _basic_unet(spatial_dims: int) -> nn.Module:
    torch.manual_seed(0)
    return monai_nets.BasicUNet(spatial_dims=spatial_dims, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4))


def test_basic_unet_fx_trace_drops_the_skip_concatenation():
    """The root cause, with plain torch.fx: no ``cat`` in the traced graph, although eager concatenates."""
    model = _basic_unet(2).eval()
    calls = []
    real_cat = torch.cat

    def counting_cat(*args, **kwargs):
        calls.append(1)
        return real_cat(*args, **kwargs)

    x = torch.randn(1, 1, 32, 32)
    torch.cat = counting_cat
    try:
        with torch.no_grad():
            model(x)
    finally:
        torch.cat = real_cat
    assert len(calls) == 4  # eager: one skip concatenation per decoder step
    gm = torch.fx.symbolic_trace(model)
    assert not [n for n in gm.graph.nodes if n.target in (torch.cat, "cat")]
    with pytest.raises(RuntimeError, match="channels"):
        gm(x)  # the conv after the dropped cat gets the upsampled channels only


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_wrap_refuses_basic_unet(spatial_dims):
    model = _basic_unet(spatial_dims)
    size = (32,) * spatial_dims
    with pytest.raises(sparsify.SparsifyError, match="(?s)torch.fx recorded a different computation.*upcat_4"):
        sparsify.wrap(model, size)


class _Fuse(nn.Module):
    """Adds an optional skip behind UpCat's check; the dropped add keeps every shape."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None and torch.jit.isinstance(skip, torch.Tensor):
            x = x + skip
        return self.bn(self.conv(x))


class _SkipInModule(nn.Module):
    """The check sits inside the module that returns the second stage."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 8, 2, 2), nn.BatchNorm2d(8), nn.ReLU())
        self.side = nn.Conv2d(8, 8, 2, 2)
        self.fuse = _Fuse(8)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.stem(x)
        return [a, self.fuse(self.down(a), self.side(a))]


class _SkipInRoot(nn.Module):
    """The check sits in the model's own forward, which returns the pyramid."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 8, 2, 2), nn.BatchNorm2d(8), nn.ReLU())
        self.side = nn.Conv2d(8, 8, 2, 2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.stem(x)
        b = self.down(a)
        s = self.side(a)
        if torch.jit.isinstance(s, torch.Tensor):
            b = b + s
        return [a, b]


@pytest.mark.parametrize("cls", [_SkipInModule, _SkipInRoot])
def test_wrap_refuses_a_graph_that_drops_a_branch(cls):
    """The dropped add keeps every shape, so only values tell: wrap runs the model and its graph once
    and refuses, wherever the check sits (inside a stage's module, or in the model's own forward,
    whose returned maps no module hook sees)."""
    torch.manual_seed(0)
    model = cls().double()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():  # the plain trace really computes something else
        assert max((f - g).abs().max().item() for f, g in zip(gm.eval()(x), model.eval()(x))) > 0.1
    with pytest.raises(sparsify.SparsifyError, match="torch.fx recorded a different computation"):
        sparsify.wrap(model, (32, 32))


def test_a_faithful_graph_still_wraps():
    """The same networks without the check wrap and keep the contract (the comparison does not
    refuse what fx records faithfully)."""

    class _Plain(_SkipInRoot):
        def forward(self, x):
            a = self.stem(x)
            return [a, self.down(a) + self.side(a)]

    torch.manual_seed(0)
    model = _Plain().double()
    enc = sparsify.wrap(model, (32, 32))
    sparsify.verify(enc)
