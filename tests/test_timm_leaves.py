"""timm's fx leaf modules are traced through; one is kept whole (and then needs an adapter if it
touches space) only when tracing inside it fails."""

from __future__ import annotations

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

import sparsify  # noqa: E402
from sparsify.testing import assert_sparse_semantics  # noqa: E402


def test_timm_leaf_that_traces_is_traced_through():
    from timm.layers import ConvMlp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), ConvMlp(8, 16, norm_layer=nn.BatchNorm2d), nn.Conv2d(8, 8, 3, 2, 1))
    enc = sparsify.wrap(model, (32, 48))
    modules = dict(enc.named_modules())
    assert not any(n.op == "call_module" and isinstance(modules.get(n.target), ConvMlp) for n in enc.graph.nodes)
    assert_sparse_semantics(model, input_size=(32, 48))


class _BranchesOnValues(nn.Module):
    """A block whose forward branches on tensor values: fx cannot trace inside it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, 1, 1)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else x


def test_timm_leaf_that_fails_to_trace_is_kept_whole_and_named():
    from timm.layers._fx import _leaf_modules

    _leaf_modules.add(_BranchesOnValues)  # as timm's register_notrace_module does
    try:
        model = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), _BranchesOnValues(), nn.Conv2d(8, 8, 3, 2, 1))
        with pytest.raises(sparsify.SparsifyError, match="_BranchesOnValues") as info:
            sparsify.wrap(model, (32, 48))
        assert "no adapter" in str(info.value)
    finally:
        _leaf_modules.discard(_BranchesOnValues)
