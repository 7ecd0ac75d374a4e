"""The random-CNN generator and the Hypothesis strategies of sparsify.testing."""

from __future__ import annotations

import torch
import torch.fx as fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsify.testing import random_cnn as rc
from sparsify.testing import strategies as sst
from sparsify.testing.random_cnn import build_cnn

_FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FAST
@given(
    spec=sst.random_cnn_specs(),
    grid=sst.grid_sizes(1, 3).filter(lambda g: g[0] * g[1] >= 2),
    batch=st.integers(1, 3),
)
def test_random_cnns_build_trace_and_keep_sizes(spec, grid, batch):
    net = build_cnn(spec)
    r = net.downsample_ratio
    assert r == spec.downsample_ratio and r in (2, 4, 8)
    batch = max(batch, spec.min_train_batch)  # BatchNorm over pooled vectors needs two samples
    x = torch.randn(batch, spec.in_chans, grid[0] * r, grid[1] * r)
    for train in (True, False):
        # Trace in the mode it runs in: plain symbolic_trace specialises some modules on the mode
        # (timm's BatchNormAct2d; sparsify's tracer keeps those as leaves, as timm does).
        net.train(train)
        traced = fx.symbolic_trace(net)
        with torch.no_grad():
            y = net(x)
            y_traced = traced(x)
        assert y.shape == net.output_shape(batch, tuple(x.shape[-2:]))
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y_traced, y)


@_FAST
@given(spec=sst.random_cnn_specs(head=False))
def test_features_have_exact_size(spec):
    net = build_cnn(spec).eval()
    r = net.downsample_ratio
    y = net(torch.randn(1, spec.in_chans, 2 * r, 3 * r))
    assert y.shape == (1, net.out_channels, 2, 3)


@settings(max_examples=30, deadline=None)
@given(spec=sst.random_cnn_specs())
def test_spec_repr_is_valid_python_and_rebuilds_identically(spec):
    namespace = {name: getattr(rc, name) for name in rc.__all__}
    again = eval(repr(spec), namespace)
    assert again == spec
    a, b = build_cnn(spec), build_cnn(again)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_build_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_cnn(rc.CNNSpec(in_chans=3, blocks=(rc.ConvSpec(out=4, stride=2),), seed=7))
    assert torch.equal(torch.rand(3), expected)


def test_every_ingredient_builds():
    spec = rc.every_ingredient_spec()
    net = build_cnn(spec)
    assert net.downsample_ratio == 8 and net.out_channels == 4
    traced = fx.symbolic_trace(net)
    x = torch.randn(2, 3, 16, 24)
    assert traced(x).shape == (2, 5)
    ops = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert torch.cat in ops and torch.sigmoid in ops


@settings(max_examples=50, deadline=None)
@given(data=st.data(), batch=sst.batch_sizes(), grid=sst.grid_sizes(1, 4))
def test_masks_keep_a_visible_patch_per_sample(data, batch, grid):
    m = data.draw(sst.masks(batch, grid, min_visible=2))
    assert m.dtype == torch.bool and m.shape == (batch, 1, *grid)
    assert (m.flatten(1).sum(1) >= min(2, grid[0] * grid[1])).all()


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_masks_may_be_fully_masked_when_asked(data):
    m = data.draw(sst.masks(2, (1, 2), allow_fully_masked=True))
    assert m.shape == (2, 1, 1, 2)


@settings(max_examples=30, deadline=None)
@given(size=sst.input_sizes(8, square=False), chans=sst.channel_counts(1, 3), data=st.data())
def test_input_sizes_and_images(size, chans, data):
    assert size[0] % 8 == 0 and size[1] % 8 == 0 and size[0] != size[1]
    x = data.draw(sst.images(2, chans, size))
    assert x.shape == (2, chans, *size) and x.dtype == torch.float32 and torch.isfinite(x).all()


@settings(max_examples=20, deadline=None)
@given(case=sst.cnn_cases())
def test_cnn_cases_fit_together(case):
    r = case.model.downsample_ratio
    assert case.x.shape[1] == case.model.in_chans
    assert case.mask.shape == (case.x.shape[0], 1, case.x.shape[2] // r, case.x.shape[3] // r)
    assert (case.mask.flatten(1).sum(1) >= 1).all()
