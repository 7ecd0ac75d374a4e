"""Masked GroupNorm == per sample and group, mean/var over the gathered active entries."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from sparsify.adapters import masked_group_norm, masked_group_norm_fn
from torch import nn

from ._helpers import SETTINGS, cases, check_contract, per_sample, reference_norm, stat_atol


@st.composite
def group_cases(draw):
    groups = draw(st.integers(1, 3))
    per_group = draw(st.integers(1, 3))
    case = draw(cases(channels=groups * per_group))
    return case, groups


def reference(x, mask, groups, weight, bias, eps):
    """Per sample: gather its (C, n) active matrix, normalise each group's block of rows."""
    out = []
    for b in range(x.shape[0]):
        active = per_sample(x, mask, b)  # (C, n_b)
        blocks = [reference_norm(blk, eps) for blk in active.chunk(groups, 0)]
        y = torch.cat(blocks, 0)
        if weight is not None:
            y = y * weight[:, None] + bias[:, None]
        out.append(y)
    return out


def _tol(x, mask, groups, eps, scale=1.0):
    blocks = [blk for b in range(x.shape[0]) for blk in per_sample(x, mask, b).chunk(groups, 0)]
    return dict(rtol=1e-4, atol=stat_atol(blocks, eps) * scale)


def _module(c, groups, eps, affine, seed):
    gn = nn.GroupNorm(groups, c, eps=eps, affine=affine)
    if affine:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            gn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            gn.bias.copy_(torch.randn(c, generator=gen))
    return gn


@SETTINGS
@given(gc=group_cases(), eps=st.sampled_from([1e-5, 1e-3, 0.1]), affine=st.booleans())
def test_equals_gathered_reference(gc, eps, affine):
    case, groups = gc
    gn = _module(case.x.shape[1], groups, eps, affine, case.seed)
    y = masked_group_norm(gn, case.x, case.mask)
    expected = reference(case.x, case.mask, groups, gn.weight, gn.bias, eps)
    for b, e in enumerate(expected):
        torch.testing.assert_close(per_sample(y, case.mask, b), e, **_tol(case.x, case.mask, groups, eps))
    y_fn = masked_group_norm_fn(case.mask, case.x, groups, gn.weight, gn.bias, eps)
    assert torch.equal(y_fn, y)


@SETTINGS
@given(gc=group_cases(), eps=st.sampled_from([1e-5, 0.1]), affine=st.booleans())
def test_no_mask_equals_plain_and_masked_sites_do_not_matter(gc, eps, affine):
    case, groups = gc
    gn = _module(case.x.shape[1], groups, eps, affine, case.seed)
    if case.x[0, : case.x.shape[1] // groups].numel() > 1:  # PyTorch refuses one value per group
        assert torch.equal(masked_group_norm(gn, case.x, None), gn(case.x))
        assert torch.equal(masked_group_norm_fn(None, case.x, groups, gn.weight, gn.bias, eps),
                           F.group_norm(case.x, groups, gn.weight, gn.bias, eps))
    y = masked_group_norm(gn, case.x, case.mask)
    y2 = masked_group_norm(gn, case.garbage(), case.mask)
    keep = case.mask.bool().expand_as(y)
    assert torch.equal(y[keep], y2[keep])


@SETTINGS
@given(gc=group_cases(), affine=st.booleans())
def test_backward_equals_gathered_reference(gc, affine):
    case, groups = gc
    gn = _module(case.x.shape[1], groups, 1e-5, affine, case.seed)
    x = case.x.clone().requires_grad_()
    x_ref = case.x.clone().requires_grad_()
    w_ref = gn.weight.detach().clone().requires_grad_() if affine else None
    b_ref = gn.bias.detach().clone().requires_grad_() if affine else None
    gen = torch.Generator().manual_seed(case.seed + 3)
    y = masked_group_norm(gn, x, case.mask)
    expected = reference(x_ref, case.mask, groups, w_ref, b_ref, 1e-5)
    loss = loss_ref = 0
    g_max = 0.0
    for b, e in enumerate(expected):
        g = torch.randn(e.shape, generator=gen)
        g_max = max(g_max, float(g.abs().max()))
        loss = loss + (per_sample(y, case.mask, b) * g).sum()
        loss_ref = loss_ref + (e * g).sum()
    loss.backward()
    loss_ref.backward()
    # The input gradient is a difference of terms of size rstd * |g|: the tolerance scales with them.
    blocks = [blk for b in range(case.x.shape[0]) for blk in per_sample(case.x, case.mask, b).chunk(groups, 0)]
    rstd = max(float((blk.var(unbiased=False) + 1e-5).rsqrt()) for blk in blocks)
    tol = _tol(case.x, case.mask, groups, 1e-5, 1 + rstd * g_max)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    if affine:
        torch.testing.assert_close(gn.weight.grad, w_ref.grad, **tol)
        torch.testing.assert_close(gn.bias.grad, b_ref.grad, **tol)


class _GNNet(nn.Module):
    def __init__(self, functional: bool = False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, 2, 1)
        self.gn = nn.GroupNorm(4, 8)
        self.functional = functional
        self.c2 = nn.Conv2d(8, 8, 3, 2, 1)

    def forward(self, x):
        y = self.c1(x)
        y = F.group_norm(y, 2, self.gn.weight, self.gn.bias) if self.functional else self.gn(y)
        return self.gn(self.c2(F.gelu(y)))


def test_wrapped_groupnorm_nets_satisfy_the_contract():
    check_contract(_GNNet())
    check_contract(_GNNet(functional=True), train=False)
