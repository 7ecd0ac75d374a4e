"""Densify: masked normalisation, mask token, projection."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsify.errors import SparsifyError
from sparsify.spark._patches import repeat_mask
from sparsify.spark.densify import (
    ChannelLayerNorm2d,
    Densify,
    MaskedBatchNorm2d,
    resolve_densify_norm,
)


def _mask(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, 1, h, w, generator=g) < 0.5
    m[:, :, 0, 0] = True  # at least one active site per sample
    return m


def _gather(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Active feature vectors (N, C) via boolean indexing: the reference layout."""
    return x.permute(0, 2, 3, 1)[mask[:, 0]]


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    c=st.integers(1, 6),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    seed=st.integers(0, 10_000),
)
def test_masked_batchnorm_matches_batchnorm1d_on_gathered_active_sites(b, c, h, w, seed):
    torch.manual_seed(seed)
    x = torch.randn(b, c, h, w, dtype=torch.float64) * 3 + 1
    mask = _mask(b, h, w, seed)
    n_active = int(mask.sum())
    x = x * mask  # like the encoder: masked sites are zero

    mbn = MaskedBatchNorm2d(c).double()
    ref = nn.BatchNorm1d(c).double()
    with torch.no_grad():
        w_ = torch.randn(c, dtype=torch.float64)
        b_ = torch.randn(c, dtype=torch.float64)
        for m in (mbn, ref):
            m.weight.copy_(w_)
            m.bias.copy_(b_)

    y = mbn(x, mask)
    if n_active > 1:  # BatchNorm1d refuses a single value per channel in training mode
        y_ref = ref(_gather(x, mask))
        torch.testing.assert_close(_gather(y, mask), y_ref)
        torch.testing.assert_close(mbn.running_mean, ref.running_mean)
        torch.testing.assert_close(mbn.running_var, ref.running_var)
        assert int(mbn.num_batches_tracked) == int(ref.num_batches_tracked)

        mbn.eval()
        ref.eval()
        torch.testing.assert_close(_gather(mbn(x, mask), mask), ref(_gather(x, mask)))


def test_masked_batchnorm_ignores_values_at_masked_sites_and_their_count():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 5)
    mask = _mask(2, 3, 5, 1)
    a = MaskedBatchNorm2d(4)
    b = MaskedBatchNorm2d(4)
    garbage = torch.where(mask, x, torch.randn_like(x) * 100)
    ya = a(x * mask, mask)
    yb = b(garbage, mask)
    torch.testing.assert_close(_gather(ya, mask), _gather(yb, mask))
    torch.testing.assert_close(a.running_mean, b.running_mean)
    torch.testing.assert_close(a.running_var, b.running_var)

    # appending a fully-masked sample changes nothing
    x3 = torch.cat([x * mask, torch.randn(1, 4, 3, 5)])
    m3 = torch.cat([mask, torch.zeros(1, 1, 3, 5, dtype=torch.bool)])
    y3 = MaskedBatchNorm2d(4)(x3, m3)
    torch.testing.assert_close(_gather(y3[:2], mask), _gather(ya, mask))


def test_masked_batchnorm_cumulative_momentum():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    mask = _mask(2, 4, 4, 3)
    mbn = MaskedBatchNorm2d(3, momentum=None)
    ref = nn.BatchNorm1d(3, momentum=None)
    for _ in range(3):
        mbn(x, mask)
        ref(_gather(x, mask))
    torch.testing.assert_close(mbn.running_var, ref.running_var)


def test_channel_layernorm_is_per_site_layernorm():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4)
    ln = ChannelLayerNorm2d(5)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (5,), ln.weight, ln.bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref)


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_mask_token_fills_only_masked_sites(norm):
    torch.manual_seed(0)
    d = Densify(6, 6, norm, coarsest=True)  # identity projection: output = normalised feature / token
    assert isinstance(d.proj, nn.Identity)
    mask = _mask(2, 3, 4, 7)
    x = torch.randn(2, 6, 3, 4) * mask
    y = d(x, mask)
    token = d.mask_token.view(1, 6, 1, 1).expand_as(y)
    masked = ~mask.expand_as(y)
    torch.testing.assert_close(y[masked], token[masked])
    expected = d.norm(x, mask) if norm != "none" else x
    torch.testing.assert_close(y[~masked], expected[~masked])
    # gradient reaches the token only through masked sites
    y.sum().backward()
    assert torch.allclose(d.mask_token.grad.view(-1), (~mask).sum().float().expand(6))


def test_mask_token_init_is_small_truncated_normal():
    torch.manual_seed(0)
    d = Densify(4096, 8, "none", coarsest=True)
    t = d.mask_token.detach()
    assert t.shape == (1, 4096, 1, 1)
    assert t.abs().max() <= 0.04 + 1e-7
    assert 0.012 < float(t.std()) < 0.025


def test_densify_repeats_a_coarse_mask_to_the_feature_resolution():
    torch.manual_seed(0)
    d = Densify(3, 3, "none", coarsest=False)
    mask = _mask(1, 2, 3, 0)
    x = torch.randn(1, 3, 8, 12)
    fine = repeat_mask(mask, (8, 12))
    torch.testing.assert_close(d(x, mask), d(x, fine))


def test_projection_kinds():
    # the official SparK: identity only at the coarsest scale when widths match; finer scales keep a 3x3
    assert isinstance(Densify(8, 8, "batch", coarsest=True).proj, nn.Identity)
    same = Densify(8, 8, "batch", coarsest=False).proj
    assert isinstance(same, nn.Conv2d) and same.kernel_size == (3, 3) and same.out_channels == 8
    p1 = Densify(16, 8, "batch", coarsest=True).proj
    p3 = Densify(16, 8, "batch", coarsest=False).proj
    assert isinstance(p1, nn.Conv2d) and p1.kernel_size == (1, 1)
    assert isinstance(p3, nn.Conv2d) and p3.kernel_size == (3, 3) and p3.padding == (1, 1)
    ones = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    y = Densify(16, 8, "layer", coarsest=False)(torch.randn(2, 16, 5, 7), ones)
    assert y.shape == (2, 8, 5, 7)


def test_resolve_densify_norm():
    assert resolve_densify_norm("auto", "batch") == "batch"
    for nt in ("layer", "group", None):
        assert resolve_densify_norm("auto", nt) == "layer"
    assert resolve_densify_norm("LAYER", "batch") == "layer"
    assert resolve_densify_norm(None, "batch") == "none"
    with pytest.raises(SparsifyError, match="densify_norm"):
        resolve_densify_norm("instance", "batch")
    with pytest.raises(SparsifyError):
        Densify(4, 4, "weird", coarsest=True)
