"""The generated light UNet decoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsify.errors import SparsifyError
from sparsify.spark.decoder import LightDecoder, UpBlock, decoder_steps, decoder_widths, upsampler

PYRAMIDS = [[4, 8, 16, 32], [2, 4, 8, 16, 32], [8, 16, 32], [4, 8, 16], [7], [6, 12], [3, 9, 18]]


def _features(dec: LightDecoder, b: int, h: int, w: int) -> list[torch.Tensor]:
    strides = dec.feature_strides[::-1]
    return [torch.randn(b, c, h // s, w // s) for c, s in zip(dec.skip_widths, strides)]


def test_decoder_steps():
    assert decoder_steps([4, 8, 16, 32]) == [2, 2, 2, 2, 2]
    assert decoder_steps([2, 4, 8, 16, 32]) == [2, 2, 2, 2, 2]
    assert decoder_steps([8, 16, 32]) == [2, 2, 2, 2, 2]
    assert decoder_steps([4, 8, 16]) == [2, 2, 2, 2]
    assert decoder_steps([7]) == [7]
    assert decoder_steps([6, 12]) == [2, 3, 2]
    assert decoder_steps([4, 16]) == [4, 2, 2]
    assert decoder_steps([1, 3]) == [3]
    assert decoder_widths(768, 5) == [768, 384, 192, 96, 48, 24]
    assert decoder_widths(4, 4) == [4, 2, 1, 1, 1]


@pytest.mark.parametrize("bad", [[], [4, 6], [8, 4], [4, 4], [0, 4], [2.5, 5]])
def test_bad_strides_are_refused(bad):
    with pytest.raises(SparsifyError):
        LightDecoder(bad, 32, 3)


@pytest.mark.parametrize("bad_width", [0, -1, 2.5])
def test_bad_width_is_refused(bad_width):
    with pytest.raises(SparsifyError, match="decoder_width"):
        LightDecoder([4, 8], bad_width, 3)


@pytest.mark.parametrize("strides", PYRAMIDS, ids=str)
@pytest.mark.parametrize("in_chans", [1, 4])
def test_decoder_output_shape(strides, in_chans):
    dec = LightDecoder(strides, 32, in_chans)
    r = strides[-1]
    h, w = 2 * r, 3 * r  # non-square
    out = dec(_features(dec, 2, h, w))
    assert out.shape == (2, in_chans, h, w)
    assert torch.isfinite(out).all()


def test_paper_decoder_layout():
    dec = LightDecoder([4, 8, 16, 32], 768, 3)
    assert dec.widths == [768, 384, 192, 96, 48, 24]
    assert dec.skip_widths == [768, 384, 192, 96]
    blk = dec.blocks[0]
    assert isinstance(blk, UpBlock)
    assert blk.up.kernel_size == (4, 4) and blk.up.stride == (2, 2) and blk.up.padding == (1, 1)
    kinds = [type(m) for m in blk.conv]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU6, nn.Conv2d, nn.BatchNorm2d]
    assert dec.proj.kernel_size == (1, 1) and dec.proj.out_channels == 3


@settings(max_examples=20, deadline=None)
@given(ratio=st.integers(2, 7), h=st.integers(1, 5), w=st.integers(1, 5))
def test_upsampler_is_exactly_ratio_times(ratio, h, w):
    up = upsampler(2, ratio)
    assert up.kernel_size == (2 * ratio, 2 * ratio) and up.stride == (ratio, ratio)
    assert up(torch.randn(1, 2, h, w)).shape == (1, 2, h * ratio, w * ratio)


def test_skips_are_added():
    torch.manual_seed(0)
    dec = LightDecoder([4, 8], 8, 1).eval()
    feats = _features(dec, 1, 16, 24)
    base = dec(feats)
    bumped = dec([feats[0], feats[1] + 1.0])
    assert (base - bumped).abs().max() > 0


def test_skip_size_mismatch_is_reported():
    dec = LightDecoder([4, 8], 8, 1)
    feats = _features(dec, 1, 16, 24)
    with pytest.raises(SparsifyError, match="multiple of the downsample ratio"):
        dec([feats[0], feats[1][..., :-1]])
    with pytest.raises(SparsifyError, match="scales"):
        dec(feats[:1])
