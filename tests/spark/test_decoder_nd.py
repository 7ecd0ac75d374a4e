"""The generated decoder for signals and volumes: per-axis steps, transposed convs that leave a ratio-1
axis alone, output at the input's size, and the stride-1 skip."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsify._geometry import per_axis
from sparsify.errors import SparsifyError
from sparsify.spark.decoder import LightDecoder, decoder_steps, upsampler

CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _features(dec: LightDecoder, b: int, size: tuple[int, ...]) -> list[torch.Tensor]:
    """Random densified features, coarsest first, at each scale's size for input ``size``."""
    out = []
    for c, s in zip(dec.skip_widths, dec.feature_strides[::-1]):
        s = per_axis(s, dec.spatial_dims)
        out.append(torch.randn(b, c, *(n // k for n, k in zip(size, s))))
    return out


def test_per_axis_steps():
    # a video / thick-slice pyramid: the stem strides (1, 2, 2)
    assert decoder_steps([(1, 2, 2), (2, 4, 4), (4, 8, 8)], 3) == [2, 2, (1, 2, 2)]
    # nnU-Net plan [[1,1,1],[1,2,2],[2,2,2],[2,2,2],[1,2,2]] from stride 1: no extra steps
    plan = [(1, 1, 1), (1, 2, 2), (2, 4, 4), (4, 8, 8), (4, 16, 16)]
    assert decoder_steps(plan, 3) == [(1, 2, 2), 2, 2, (1, 2, 2)]
    # finest stride (2, 4, 4): the axis with fewer factors gets ratio 1 in the last step
    assert decoder_steps([(2, 4, 4)], 3) == [2, (1, 2, 2)]
    assert decoder_steps([4, 8, 16, 32], 3) == [2, 2, 2, 2, 2]  # isotropic 3-D reads as ints
    assert decoder_steps([4, 16], 1) == [4, 2, 2]
    assert decoder_steps([(3, 2)], 2) == [(3, 2)]


@pytest.mark.parametrize(
    "bad",
    [[(1, 2, 2), (1, 2, 2)], [(1, 2, 2), (2, 1, 4)], [(1, 2, 2), (2, 3, 4)], [(1, 2)], [(0, 2, 2)]],
    ids=str,
)
def test_bad_per_axis_strides_are_refused(bad):
    with pytest.raises(SparsifyError, match="feature strides"):
        LightDecoder(bad, 16, 1, spatial_dims=3)


@pytest.mark.parametrize("ratio", [(1, 2, 2), (2, 1, 3), (1, 1, 2)], ids=str)
def test_upsampler_leaves_ratio_one_axes_alone(ratio):
    up = upsampler(4, ratio, 3)
    assert isinstance(up, nn.ConvTranspose3d)
    for r, k, s in zip(ratio, up.kernel_size, up.stride):
        assert (k, s) == ((1, 1) if r == 1 else (2 * r, r))
    x = torch.zeros(1, 4, 3, 5, 4)
    x[0, :, 1, 2, 1] = 1.0  # one impulse: on a ratio-1 axis its response stays in its own slice
    y = up(x)
    assert y.shape == (1, 4, *(n * r for n, r in zip((3, 5, 4), ratio)))
    touched = (y - up.bias.view(1, -1, 1, 1, 1)).abs().sum((0, 1)) > 0
    for axis, r in enumerate(ratio):
        if r == 1:
            other = tuple(i for i in range(3) if i != axis)
            assert touched.any(dim=other).nonzero().flatten().tolist() == [1 if axis != 1 else 2]


def test_upsampler_refuses_no_upsampling():
    with pytest.raises(SparsifyError, match="ratio >= 2"):
        upsampler(4, (1, 1, 1), 3)


@st.composite
def _pyramids(draw):
    """Random per-axis pyramids (finest -> coarsest) of 1-3 scales, each step 1x-3x per axis."""
    rank = draw(st.sampled_from([1, 3]))
    finest = tuple(draw(st.sampled_from([1, 2, 3, 4])) for _ in range(rank))
    strides = [finest]
    for _ in range(draw(st.integers(0, 2))):
        step = tuple(draw(st.integers(1, 3)) for _ in range(rank))
        if max(step) == 1:
            step = (2,) + step[1:]
        strides.append(tuple(a * b for a, b in zip(strides[-1], step)))
    if rank == 3 and max(finest) == 1 and len(strides) == 1:
        strides.append((1, 2, 2))
    return rank, strides


@settings(max_examples=20, deadline=None)
@given(pyramid=_pyramids(), in_chans=st.integers(1, 3))
def test_decoder_output_has_the_input_size_for_any_per_axis_pyramid(pyramid, in_chans):
    rank, strides = pyramid
    dec = LightDecoder(strides, 8, in_chans, spatial_dims=rank)
    assert all(type(b.up) is CONV_T[rank] for b in dec.blocks)
    norms = [m for b in dec.blocks for m in b.conv if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is BN[rank] for m in norms)
    # the steps multiply up to the coarsest stride on every axis
    total = [math.prod(per_axis(s, rank)[a] for s in dec.steps) for a in range(rank)]
    assert tuple(total) == strides[-1]
    size = tuple(2 * s for s in strides[-1])
    out = dec(_features(dec, 2, size))
    assert out.shape == (2, in_chans, *size)


def test_a_stride_one_scale_joins_the_decoder():
    # nnssl decodes with the UNet's skips from stride 1: that finest feature must reach the output
    torch.manual_seed(0)
    dec = LightDecoder([(1, 1, 1), (1, 2, 2), (2, 4, 4)], 8, 1, spatial_dims=3).eval()
    feats = _features(dec, 1, (4, 8, 8))
    base = dec(feats)
    bumped = feats[:-1] + [feats[-1] + 1.0]
    assert not torch.allclose(dec(bumped), base)


def test_decoder_refuses_features_of_the_wrong_size():
    dec = LightDecoder([(1, 2, 2), (2, 4, 4)], 8, 1, spatial_dims=3)
    feats = _features(dec, 1, (4, 8, 8))
    feats[1] = feats[1][..., :-1]
    with pytest.raises(SparsifyError, match="multiple of the downsample ratio"):
        dec(feats)
