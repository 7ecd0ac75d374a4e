"""Densify for signals and volumes: masked BatchNorm1d/3d against BatchNorm1d over the gathered active
vectors, LayerNorm over channels, mask tokens and projections of the encoder's rank."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsify.spark.densify import (
    ChannelLayerNorm,
    ChannelLayerNorm2d,
    Densify,
    MaskedBatchNorm1d,
    MaskedBatchNorm2d,
    MaskedBatchNorm3d,
)

MASKED_BN = {1: MaskedBatchNorm1d, 2: MaskedBatchNorm2d, 3: MaskedBatchNorm3d}
TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _gather(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Active feature vectors (N, C) via boolean indexing: the reference layout."""
    return x.movedim(1, -1)[mask[:, 0]]


def _mask(b: int, size: tuple[int, ...], seed: int) -> torch.Tensor:
    m = torch.rand(b, 1, *size, generator=torch.Generator().manual_seed(seed)) < 0.5
    m[(slice(None), 0) + (0,) * len(size)] = True  # at least one active site per sample
    return m


@settings(max_examples=25, deadline=None)
@given(
    rank=st.sampled_from([1, 3]),
    b=st.integers(1, 3),
    c=st.integers(1, 5),
    size=st.lists(st.integers(1, 4), min_size=3, max_size=3),
    seed=st.integers(0, 10_000),
)
def test_masked_batchnorm_nd_matches_batchnorm1d_on_gathered_active_sites(rank, b, c, size, seed):
    size = tuple(size[:rank])
    torch.manual_seed(seed)
    mask = _mask(b, size, seed)
    x = (torch.randn(b, c, *size, dtype=torch.float64) * 3 + 1) * mask
    mbn = MASKED_BN[rank](c).double()
    assert isinstance(mbn, TORCH_BN[rank])  # torch's class, parameter and buffer names
    ref = nn.BatchNorm1d(c).double()
    with torch.no_grad():
        w, bias = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
        for m in (mbn, ref):
            m.weight.copy_(w)
            m.bias.copy_(bias)
    y = mbn(x, mask)
    assert y.shape == x.shape
    if int(mask.sum()) > 1:  # BatchNorm1d refuses a single value per channel in training mode
        torch.testing.assert_close(_gather(y, mask), ref(_gather(x, mask)))
        torch.testing.assert_close(mbn.running_mean, ref.running_mean)
        torch.testing.assert_close(mbn.running_var, ref.running_var)
        mbn.eval()
        ref.eval()
        torch.testing.assert_close(_gather(mbn(x, mask), mask), ref(_gather(x, mask)))


@pytest.mark.parametrize("rank", [1, 3])
def test_masked_batchnorm_nd_ignores_masked_values_and_fully_masked_samples(rank):
    torch.manual_seed(0)
    size = (3, 4, 5)[:rank]
    x = torch.randn(2, 4, *size)
    mask = _mask(2, size, 1)
    a, b = MASKED_BN[rank](4), MASKED_BN[rank](4)
    ya = a(x * mask, mask)
    yb = b(torch.where(mask, x, torch.randn_like(x) * 100), mask)
    torch.testing.assert_close(_gather(ya, mask), _gather(yb, mask))
    torch.testing.assert_close(a.running_var, b.running_var)
    x3 = torch.cat([x * mask, torch.randn(1, 4, *size)])
    m3 = torch.cat([mask, torch.zeros(1, 1, *size, dtype=torch.bool)])
    torch.testing.assert_close(_gather(MASKED_BN[rank](4)(x3, m3)[:2], mask), _gather(ya, mask))


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_channel_layernorm_is_per_site_layernorm_in_every_rank(rank):
    torch.manual_seed(0)
    x = torch.randn(2, 5, *(3, 4, 2)[:rank])
    ln = ChannelLayerNorm(5)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    ref = F.layer_norm(x.movedim(1, -1), (5,), ln.weight, ln.bias, 1e-6).movedim(-1, 1)
    torch.testing.assert_close(ln(x), ref)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_densify_uses_the_encoder_rank(rank, norm):
    torch.manual_seed(0)
    size = (4, 6, 2)[:rank]
    d = Densify(6, 6, norm, coarsest=True, spatial_dims=rank)
    assert d.mask_token.shape == (1, 6) + (1,) * rank
    if norm == "batch":
        assert type(d.norm) is MASKED_BN[rank]
    if norm == "layer":  # 2-D keeps its own class name (pickles, isinstance checks)
        assert type(d.norm) is (ChannelLayerNorm2d if rank == 2 else ChannelLayerNorm)
    mask = _mask(2, size, 7)
    x = torch.randn(2, 6, *size) * mask
    y = d(x, mask)
    masked = ~mask.expand_as(y)
    token = d.mask_token.expand_as(y)
    torch.testing.assert_close(y[masked], token[masked])
    expected = d.norm(x, mask) if norm != "none" else x
    torch.testing.assert_close(y[~masked], expected[~masked])

    fine = Densify(6, 4, norm, coarsest=False, spatial_dims=rank)
    assert type(fine.proj) is CONV[rank] and fine.proj.kernel_size == (3,) * rank
    coarse = Densify(6, 4, norm, coarsest=True, spatial_dims=rank)
    assert type(coarse.proj) is CONV[rank] and coarse.proj.kernel_size == (1,) * rank
    assert fine(x, mask).shape == (2, 4, *size)


def test_densify_brings_a_finer_mask_to_a_coarser_feature_as_any_visible():
    # a mask patch finer than the stage: a feature cell is active when any of its patches is visible
    d = Densify(2, 2, "none", coarsest=True, spatial_dims=3)
    mask = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    mask[0, 0, 0, 0, 1] = True  # one visible patch inside coarse cell (0, 0, 0)
    x = torch.ones(1, 2, 2, 2, 2)
    y = d(x, mask)
    assert torch.equal(y[0, :, 0, 0, 0], x[0, :, 0, 0, 0])  # kept
    token = d.mask_token.view(2)
    assert torch.equal(y[0, :, 1, 1, 1], token.detach())  # no visible patch: the token


def test_densify_refuses_an_unsupported_rank():
    from sparsify.errors import SparsifyError

    with pytest.raises(SparsifyError, match="1, 2 or 3 spatial dimensions"):
        Densify(4, 4, "batch", coarsest=True, spatial_dims=4)
