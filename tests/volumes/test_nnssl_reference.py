"""sparsify agrees with a hand-written float64 reference of nnssl's SparK3D encoder semantics.

The reference (``_nnssl_reference.py``) zeroes the input at masked voxels, runs every convolution on
zeros at masked sites and zeroes its output there, takes InstanceNorm statistics over visible voxels
only and averages pools over visible voxels. It is checked first against the unmodified network
(nothing masked: it must be the model's own forward), then sparsify is checked against it with random
masks, on nnU-Net's residual encoder (dynamic_network_architectures), in float64, train and eval.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsify

from . import _nnssl_reference as ref

TOL = 1e-10


def res_enc(rank: int, strides, features=(4, 6, 8, 8, 8), blocks=(1, 2, 1, 1, 1), seed: int = 0) -> nn.Module:
    """A small nnU-Net ResEnc encoder (InstanceNorm with affine, LeakyReLU), returning every stage."""
    torch.manual_seed(seed)
    n = len(strides)
    enc = ResidualEncoder(
        1, n, list(features[:n]), {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank], 3, strides, list(blocks[:n]),
        conv_bias=True, norm_op={1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[rank],
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True, "negative_slope": 0.01}, return_skips=True,
    )
    with torch.no_grad():  # non-trivial affine parameters, so a norm that ignores them shows
        for m in enc.modules():
            if isinstance(m, nn.modules.instancenorm._InstanceNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return enc.double()


def _random_block_mask(batch: int, grid, seed: int, ratio: float = 0.6) -> torch.Tensor:
    mask = sparsify.random_mask(batch, grid, ratio, generator=torch.Generator().manual_seed(seed))
    mask[0].view(-1)[0] = True  # at least one visible block per sample
    return mask


@pytest.mark.parametrize("train", [True, False])
def test_reference_is_the_model_when_nothing_is_masked(train):
    model = res_enc(2, [1, 2, 2, 2]).train(train)
    x = torch.randn(2, 1, 32, 48, dtype=torch.float64)
    masks = ref.MaskPyramid(torch.ones(2, 1, 4, 6, dtype=torch.bool), (8, 8))
    with torch.no_grad():
        expected = model(x.clone())
        got = ref.encoder_features(model, x, masks)
    assert len(got) == len(expected) == 4
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=TOL, rtol=0)


def test_reference_drops_masked_voxels():
    """Changing the input under masked blocks changes nothing (the reference really ignores them)."""
    model = res_enc(2, [1, 2, 2, 2])
    x = torch.randn(2, 1, 32, 48, dtype=torch.float64)
    block_mask = _random_block_mask(2, (4, 6), seed=1)
    masks = ref.MaskPyramid(block_mask, (8, 8))
    y = x + torch.randn_like(x) * 10 * (1 - masks.voxels)
    with torch.no_grad():
        for a, b in zip(ref.encoder_features(model, x, masks), ref.encoder_features(model, y, masks)):
            torch.testing.assert_close(a, b, atol=TOL, rtol=0)
            assert (a * (1 - masks.at(a.shape[2:]))).abs().max() == 0


def _compare(enc, model, x, block_mask, block, train: bool, coarse: str = "dense"):
    masks = ref.MaskPyramid(block_mask, block, coarse)
    with torch.no_grad():
        got = enc.train(train)(x, block_mask)
        expected = {ref.stride_of(f, x.shape[2:]): f for f in ref.encoder_features(model.train(train), x, masks)}
    assert got, "the encoder returned no stage"
    for feature in got:
        stride = ref.stride_of(feature, x.shape[2:])
        torch.testing.assert_close(feature, expected[stride], atol=TOL, rtol=0, msg=lambda m, s=stride: f"{s}: {m}")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), train=st.booleans())
def test_sparsify_matches_the_reference_2d(seed, batch, train):
    """2-D, mask blocks the size of the total stride; every stage from stride 1 (nnssl uses them all)."""
    model = res_enc(2, [1, 2, 2, 2])
    enc = sparsify.wrap(model, (32, 48), stages=[f"stages.{i}" for i in range(4)])
    assert enc.feature_strides == [1, 2, 4, 8]
    x = torch.randn(batch, 1, 32, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    _compare(enc, model, x, _random_block_mask(batch, (4, 6), seed), (8, 8), train)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), chans=st.integers(1, 3),
       block=st.sampled_from([(4, 4, 4), (2, 4, 4), (4, 2, 8)]), grid=st.tuples(*[st.integers(1, 3)] * 3))
def test_mse_loss_is_the_masked_voxel_mse(seed, batch, chans, block, grid):
    """SparK(loss="mse")'s loss equals nnssl's: squared error averaged over every masked voxel and channel."""
    from sparsify.spark.loss import masked_mse_loss

    g = torch.Generator().manual_seed(seed)
    size = tuple(b * n for b, n in zip(block, grid))
    pred = torch.randn(batch, chans, *size, dtype=torch.float64, generator=g)
    target = torch.randn(batch, chans, *size, dtype=torch.float64, generator=g) * 3 + 1
    mask = torch.rand(batch, 1, *grid, generator=g) < 0.5
    mask.view(-1)[0] = False  # something is masked
    expected = ref.masked_voxel_mse(pred, target, ref.MaskPyramid(mask, block))
    torch.testing.assert_close(masked_mse_loss(pred, target, mask, block), expected, atol=1e-12, rtol=1e-12)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), train=st.booleans())
def test_sparsify_matches_the_reference_3d_blocks_finer_than_the_ratio(seed, train):
    """nnssl's geometry: 16^3 mask blocks on a stride-32 ResEnc, every stage from stride 1.

    Up to stride 16 sparsify and nnssl agree exactly. The stride-32 stage is coarser than a block:
    sparsify makes a cell visible when any of its blocks is (the reference with ``coarse="any"`` agrees),
    where nnssl runs that stage dense (and so differs there)."""
    model = res_enc(3, [1, 2, 2, 2, 2, 2], features=(2, 4, 4, 4, 4, 4), blocks=(1, 1, 1, 1, 1, 1))
    size = (32, 32, 64)
    enc = sparsify.wrap(model, size, stages=[f"stages.{i}" for i in range(6)], patch_size=16)
    assert enc.patch_size == 16 and enc.downsample_ratio == 32
    assert enc.feature_strides == [1, 2, 4, 8, 16, 32]
    x = torch.randn(2, 1, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    block_mask = _random_block_mask(2, ref.block_grid(size, (16,) * 3), seed, ratio=0.75)
    _compare(enc, model, x, block_mask, (16,) * 3, train, coarse="any")

    with torch.no_grad():  # nnssl's dense coarse stage is another computation, not a rounding difference
        nnssl = ref.encoder_features(model.train(train), x, ref.MaskPyramid(block_mask, (16,) * 3, "dense"))
        ours = enc.train(train)(x, block_mask)
    for stride, (a, b) in enumerate(zip(nnssl, ours)):
        if stride < 5:
            torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    assert (nnssl[5] - ours[5]).abs().max() > 1e-3
