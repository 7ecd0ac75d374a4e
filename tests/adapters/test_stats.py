"""The sync-free masked sums and moments that every statistic adapter builds on."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from sparsify.adapters import apply_mask, masked_moments, masked_sums

from ._helpers import SETTINGS, cases, per_sample, rows

TOL = dict(rtol=1e-4, atol=1e-4)


@SETTINGS
@given(case=cases(), over=st.sampled_from(["batch", "instance", "sample"]))
def test_moments_equal_gathered_reference(case, over):
    """Mean, biased variance and count over (B, H, W) per channel, over (H, W) per sample and
    channel, and over (C, H, W) per sample (the broadcast mask's count is multiplied by C)."""
    dims = {"batch": (0, 2, 3), "instance": (2, 3), "sample": (1, 2, 3)}[over]
    mean, var, n = masked_moments(case.x, case.mask, dims)
    s1, s2, n2 = masked_sums(case.x, case.mask, dims)
    assert torch.equal(n, n2) and mean.dtype == var.dtype == n.dtype == torch.float32
    if over == "batch":
        groups = [rows(case.x, case.mask).T]  # (C, N)
        mean, var, n = mean.flatten()[None], var.flatten()[None], n.flatten()[:1].expand(1, case.x.shape[1])
    else:
        groups = [per_sample(case.x, case.mask, b) for b in range(case.x.shape[0])]
        if over == "sample":
            groups = [g.reshape(1, -1) for g in groups]
        mean, var, n = (t.reshape(len(groups), -1) for t in (mean, var, n))
    for i, g in enumerate(groups):
        torch.testing.assert_close(mean[i], g.mean(1), **TOL)
        # one pass: var = E[x^2] - E[x]^2 in fp32 is good to about mean^2 * 2^-24
        torch.testing.assert_close(var[i], g.var(1, unbiased=False), rtol=1e-4,
                                   atol=1e-4 + 4e-7 * float(g.mean(1).square().max()))
        assert torch.equal(n[i], torch.full_like(n[i], g.shape[1]))


def test_zero_count_gives_zero_moments_not_nan():
    x = torch.randn(2, 3, 4, 4)
    m = torch.zeros(2, 1, 4, 4)
    mean, var, n = masked_moments(x, m, (2, 3))
    assert torch.equal(n, torch.zeros_like(n))
    assert torch.equal(mean, torch.zeros_like(mean)) and torch.equal(var, torch.zeros_like(var))


def test_apply_mask():
    x = torch.randn(2, 3, 4, 5)
    assert apply_mask(x, None) is x
    m = (torch.rand(2, 1, 4, 5) > 0.5).float()
    y = apply_mask(x, m)
    assert torch.equal(y, x * m) and torch.equal(y * (1 - m), torch.zeros_like(y))
    assert apply_mask(x.bfloat16(), m).dtype == torch.bfloat16


@SETTINGS
@given(case=cases(), over=st.sampled_from(["batch", "instance", "sample"]))
def test_moments_backward_equals_autograd_of_the_gathered_reference(case, over):
    """The moments' own backward (it keeps no centred copy) equals autograd through an fp64
    masked-sums reference; masked sites get exactly zero gradient."""
    dims = {"batch": (0, 2, 3), "instance": (2, 3), "sample": (1, 2, 3)}[over]
    x = case.x.clone().requires_grad_()
    mean, var, _ = masked_moments(x, case.mask, dims)
    gen = torch.Generator().manual_seed(case.seed)
    a, b = torch.randn(mean.shape, generator=gen), torch.randn(var.shape, generator=gen)
    ((mean * a).sum() + (var * b).sum()).backward()
    xd = case.x.double().requires_grad_()
    m = case.mask.double().expand_as(xd)
    n = m.sum(dims, keepdim=True).clamp_min(1.0)
    ref_mean = (xd * m).sum(dims, keepdim=True) / n
    ref_var = ((xd - ref_mean).square() * m).sum(dims, keepdim=True) / n
    ((ref_mean * a.double()).sum() + (ref_var * b.double()).sum()).backward()
    scale = float(1 + xd.detach().abs().max() * b.abs().max())
    torch.testing.assert_close(x.grad, xd.grad.float(), rtol=1e-4, atol=1e-5 * scale)
    assert torch.equal(x.grad * (1 - case.mask), torch.zeros_like(x.grad))
