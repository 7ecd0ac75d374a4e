"""The masked-patch loss."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsify.errors import SparsifyError
from sparsify.spark._patches import patchify, repeat_mask, unpatchify
from sparsify.spark.loss import masked_patch_loss


def _reference_loss(pred, target, mask, r):
    """Patch by patch with explicit loops: gather masked patches, normalise, MSE, mean."""
    b, c, h, w = target.shape
    errs = []
    for i in range(b):
        for gy in range(h // r):
            for gx in range(w // r):
                if mask[i, 0, gy, gx]:
                    continue
                t = target[i, :, gy * r : (gy + 1) * r, gx * r : (gx + 1) * r].reshape(-1)
                p = pred[i, :, gy * r : (gy + 1) * r, gx * r : (gx + 1) * r].reshape(-1)
                t = (t - t.mean()) / torch.sqrt(t.var(unbiased=True) + 1e-6)
                errs.append(((p - t) ** 2).mean())
    return torch.stack(errs).mean()


def _random_case(b, c, gh, gw, r, seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(b, c, gh * r, gw * r, generator=g, dtype=torch.float64)
    pred = torch.randn(b, c, gh * r, gw * r, generator=g, dtype=torch.float64)
    mask = torch.rand(b, 1, gh, gw, generator=g) < 0.5
    mask[0, 0, 0, 0] = False  # something is masked
    return pred, target, mask


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    c=st.integers(1, 4),
    gh=st.integers(1, 4),
    gw=st.integers(1, 4),
    r=st.integers(2, 5),
    seed=st.integers(0, 10_000),
)
def test_loss_matches_handwritten_reference(b, c, gh, gw, r, seed):
    pred, target, mask = _random_case(b, c, gh, gw, r, seed)
    got = masked_patch_loss(pred, target, mask, r)
    assert got.dtype == torch.float64  # computed in at least fp32, here double
    torch.testing.assert_close(got, _reference_loss(pred, target, mask, r))


def test_only_masked_patches_count():
    pred, target, mask = _random_case(2, 3, 3, 4, 4, 0)
    base = masked_patch_loss(pred, target, mask, 4)
    visible = repeat_mask(mask, target.shape[-2:]).expand_as(pred)
    changed = torch.where(visible, pred + 100 * torch.randn_like(pred), pred)
    torch.testing.assert_close(masked_patch_loss(changed, target, mask, 4), base)
    assert not torch.allclose(masked_patch_loss(pred + 1, target, mask, 4), base)


def test_perfect_prediction_gives_zero():
    _, target, mask = _random_case(2, 3, 2, 3, 4, 1)
    t = patchify(target, 4)
    perfect = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    pred = unpatchify(perfect, 4, 3, (2, 3))
    assert float(masked_patch_loss(pred, target, mask, 4)) < 1e-12


def test_nothing_masked_is_an_error_not_nan():
    pred, target, _ = _random_case(2, 1, 2, 2, 4, 2)
    with pytest.raises(SparsifyError, match="nothing is masked"):
        masked_patch_loss(pred, target, torch.ones(2, 1, 2, 2, dtype=torch.bool), 4)


def test_constant_patches_are_finite():
    target = torch.ones(1, 3, 8, 8)
    pred = torch.zeros(1, 3, 8, 8)
    mask = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    assert float(masked_patch_loss(pred, target, mask, 4)) == 0.0


def test_bfloat16_prediction_gives_fp32_loss():
    pred, target, mask = _random_case(1, 3, 2, 2, 4, 3)
    out = masked_patch_loss(pred.bfloat16(), target.float(), mask, 4)
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_shape_errors():
    pred, target, mask = _random_case(1, 1, 2, 2, 4, 4)
    with pytest.raises(SparsifyError):
        masked_patch_loss(pred[..., :-4], target, mask, 4)
    with pytest.raises(SparsifyError):
        masked_patch_loss(pred, target, mask[..., :1], 4)
    with pytest.raises(SparsifyError):
        masked_patch_loss(pred, target, mask, 3)
