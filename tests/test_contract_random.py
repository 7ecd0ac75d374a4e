"""The sparse-encoder contract (design.md section 2) as Hypothesis properties over random CNNs.

Each example draws a small random network (convs of kernel 1-7 with stride, dilation, groups and
depthwise; BatchNorm / BatchNormAct / LayerNorm2d (two spellings) / GroupNorm / InstanceNorm; max and
average pools incl. ceil_mode; SE blocks; residual adds; concatenation and CSP splits; ConvNeXt blocks;
activations with f(0) != 0; optional head), a non-square input that is a multiple of its R, a batch
size and a mask, wraps it with sparsify.wrap and runs every check of
sparsify.testing.assert_sparse_semantics in train and eval mode.

A failing example prints a ``CNNCase`` whose spec is valid Python: rebuild it with
``sparsify.testing.build_cnn(spec)`` (``from sparsify.testing.random_cnn import *``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsify
from sparsify.testing import assert_dense_equal, assert_sparse_semantics
from sparsify.testing import strategies as sst
from sparsify.testing.random_cnn import LayerNorm2dPermute, build_cnn, every_ingredient_spec

_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("size", [(16, 24), (32, 16)])
def test_every_ingredient_keeps_the_contract(size):
    model = build_cnn(every_ingredient_spec())
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    mask = sparsify.random_mask(2, (size[0] // 8, size[1] // 8), 0.5, generator=torch.Generator().manual_seed(0))
    assert_sparse_semantics(model, x, mask)


@settings(max_examples=40, **_SETTINGS)
@given(case=sst.cnn_cases())
def test_random_cnns_keep_the_contract(case):
    assert_sparse_semantics(case.model, case.x, case.mask)


def _gate_net(pool_tail: bool) -> nn.Module:
    from sparsify.testing.random_cnn import CNNSpec, ConcatSpec, ConvSpec, GRNSpec, PoolSpec, SESpec, SpatialGateSpec

    def conv(out, kernel, stride=1, groups=2, norm="none"):
        return ConvSpec(out=out, kernel=kernel, stride=stride, dilation=1, groups=groups, norm=norm, act="relu",
                        bias=False, functional_act=False, pad_mode="conv", conv="module")

    if pool_tail:
        blocks = (conv(2, 2, 2), ConcatSpec(branches=((conv(2, 3), conv(2, 3)), (conv(2, 3, groups=1),))),
                  GRNSpec(form="plain"), SpatialGateSpec(stats=("max",), kernel=3),
                  PoolSpec(kind="max", kernel=3, stride=1, padding=1, ceil_mode=False, count_include_pad=False,
                           functional=False, zero_pad=False))
    else:
        blocks = (conv(2, 1, 2), ConcatSpec(branches=((conv(2, 1, norm="bn"),), (conv(2, 1, norm="bn"),))),
                  GRNSpec(form="plain"), SpatialGateSpec(stats=("max",), kernel=3),
                  SESpec(reduced=1, act="relu", gate="sigmoid", pool="mean"), GRNSpec(form="plain"))
    return build_cnn(CNNSpec(in_chans=2, blocks=blocks, head=None, seed=0, spatial_dims=2))


@pytest.mark.parametrize("pool_tail,shape", [(True, (1, 2, 4, 2)), (True, (1, 2, 4, 6)), (False, (1, 2, 6, 4))])
def test_maps_of_one_size_in_two_layouts_get_their_own_masks(pool_tail, shape):
    """Draws that failed once (CI, 2026-12-05): GRN's channels-last maps and the gate's maps share sizes;
    a mask cached by sizes and axis positions alone was reused at the wrong rank."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, 1, shape[2] // 2, shape[3] // 2, dtype=torch.bool)
    assert_sparse_semantics(_gate_net(pool_tail), x, mask)


@settings(max_examples=15, **_SETTINGS)
@given(case=sst.cnn_cases(allow_fully_masked=True, max_batch=3))
def test_contract_holds_with_fully_masked_samples_in_the_batch(case):
    assert_sparse_semantics(case.model, case.x, case.mask)


@settings(max_examples=15, **_SETTINGS)
@given(case=sst.cnn_cases(square=False, norms=("bn", "bnact"), head=True))
def test_batchnorm_nets_with_heads(case):
    # The ResNet / EfficientNet family: BatchNorm everywhere, a classifier head that must be cut away.
    assert_sparse_semantics(case.model, case.x, case.mask)


@settings(max_examples=20, **_SETTINGS)
@given(
    norm=st.sampled_from(["bn", "gn", "ln2d", "in"]),
    offset=st.sampled_from([0.0, 10.0, 100.0]),
    size=sst.input_sizes(4, 2, 4),
    batch=sst.batch_sizes(1, 3),
)
def test_masked_statistics_are_as_precise_as_native_kernels(norm, offset, size, batch):
    # Features whose mean is large against their spread (here: a conv bias of up to 100) make a
    # one-pass variance E[x^2] - E[x]^2 cancel catastrophically unless the sums are accurate. The
    # all-visible masked path must then still match PyTorch's own kernels to fp32 precision; no fp64
    # witness here, since that would excuse exactly this rounding.
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, 2, 1)
    with torch.no_grad():
        conv.bias.fill_(offset)
    layer = {
        "bn": nn.BatchNorm2d(4),
        "gn": nn.GroupNorm(2, 4),
        "ln2d": LayerNorm2dPermute(4),
        "in": nn.InstanceNorm2d(4, affine=True),
    }[norm]
    model = nn.Sequential(conv, layer, nn.Conv2d(4, 4, 3, 2, 1))
    enc = sparsify.wrap(model, input_size=size)
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))
    # Both paths carry ~1e-5 of fp32 rounding here (native included); the guarded bug (fp32 partial
    # sums) gave 9e-4 to 2.3e-3, so 1e-4 separates them without the witness.
    assert_dense_equal(enc, x, atol=1e-4, rtol=1e-4, fp64_witness=False)


# --- 1-D and 3-D: the same random networks in other spatial ranks, float64 --------------------------


def _float64(case):
    return case.model.double(), case.x.double(), case.mask


@settings(max_examples=20, **_SETTINGS)
@given(case=sst.cnn_cases(spatial_dims=1, max_cells=4))
def test_random_signal_cnns_keep_the_contract_in_float64(case):
    """Random 1-D CNNs (Conv1d, BatchNorm1d, InstanceNorm1d, pools, SE, residual, ...), float64."""
    model, x, mask = _float64(case)
    assert model.spatial_dims == 1 and x.dim() == 3 and mask.dim() == 3
    assert_sparse_semantics(model, x, mask)


@settings(max_examples=10, **_SETTINGS)
@given(case=sst.cnn_cases(spatial_dims=3, max_cells=2, max_downsamples=3, max_blocks=3, max_channels=6))
def test_random_volume_cnns_keep_the_contract_in_float64(case):
    """Random 3-D CNNs at most 16^3 (R <= 8, at most 2 patches per axis), float64."""
    model, x, mask = _float64(case)
    assert model.spatial_dims == 3 and x.dim() == 5 and max(x.shape[2:]) <= 16
    assert_sparse_semantics(model, x, mask)
