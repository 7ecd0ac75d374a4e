"""Masked InstanceNorm == per sample and channel, mean/var over the gathered active sites."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from sparsify.adapters import masked_instance_norm, masked_instance_norm_fn
from torch import nn

from ._helpers import SETTINGS, cases, check_contract, per_sample, stat_atol

TOL = dict(rtol=1e-4, atol=1e-4)


def _module(c, eps, momentum, affine, track, seed):
    norm = nn.InstanceNorm2d(c, eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if affine:
            norm.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            norm.bias.copy_(torch.randn(c, generator=gen))
        if track:
            norm.running_mean.copy_(torch.randn(c, generator=gen))
            norm.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return norm


params = dict(eps=st.sampled_from([1e-5, 1e-3, 0.1]), momentum=st.sampled_from([0.1, 0.6, 0.0, None]),
              affine=st.booleans(), track=st.booleans())


@SETTINGS
@given(case=cases(min_active=2), **params)
def test_train_equals_gathered_reference(case, eps, momentum, affine, track):
    """Outputs at active sites normalise each (sample, channel) over its active sites; running
    stats move (like nn.InstanceNorm2d) towards the batch mean of the per-instance means and
    unbiased variances; momentum=None leaves them, as PyTorch does."""
    assume(case.x.shape[2] * case.x.shape[3] >= 2)
    c = case.x.shape[1]
    norm = _module(c, eps, momentum, affine, track, case.seed)
    norm.train()
    old_mean = norm.running_mean.clone() if track else None
    old_var = norm.running_var.clone() if track else None
    y = masked_instance_norm(norm, case.x, case.mask)
    means, variances = [], []
    for b in range(case.x.shape[0]):
        active = per_sample(case.x, case.mask, b)  # (C, n_b)
        mean = active.mean(1, keepdim=True)
        var = active.var(1, unbiased=False, keepdim=True)
        expected = (active - mean) / torch.sqrt(var + eps)
        if affine:
            expected = expected * norm.weight[:, None] + norm.bias[:, None]
        torch.testing.assert_close(per_sample(y, case.mask, b), expected, rtol=1e-4,
                                   atol=stat_atol(active, eps))
        means.append(mean[:, 0])
        variances.append(active.var(1, unbiased=True))
    if track:
        factor = momentum if momentum is not None else 0.0
        torch.testing.assert_close(norm.running_mean,
                                   torch.lerp(old_mean, torch.stack(means).mean(0), factor), **TOL)
        var_atol = 1e-4 + 4e-7 * float(torch.stack(means).square().max())  # one-pass moments
        torch.testing.assert_close(norm.running_var,
                                   torch.lerp(old_var, torch.stack(variances).mean(0), factor), rtol=1e-4,
                                   atol=var_atol)


@SETTINGS
@given(case=cases(min_active=2), **params)
def test_all_active_equals_plain_instance_norm(case, eps, momentum, affine, track):
    """With every site active the masked path reproduces nn.InstanceNorm2d (outputs and buffers)."""
    assume(case.x.shape[2] * case.x.shape[3] >= 2)
    c = case.x.shape[1]
    norm = _module(c, eps, momentum, affine, track, case.seed)
    plain = _module(c, eps, momentum, affine, track, case.seed)
    y = masked_instance_norm(norm, case.x, torch.ones_like(case.mask))
    instances = list(case.x.flatten(0, 1))
    torch.testing.assert_close(y, plain(case.x), rtol=1e-4, atol=stat_atol(instances, eps))
    var_atol = 1e-4 + 4e-7 * float(case.x.mean((2, 3)).square().max())
    for a, b in zip(norm.buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=var_atol)


@SETTINGS
@given(case=cases(min_active=2), **params)
def test_no_mask_eval_and_masked_sites(case, eps, momentum, affine, track):
    assume(case.x.shape[2] * case.x.shape[3] >= 2)
    c = case.x.shape[1]
    norm = _module(c, eps, momentum, affine, track, case.seed)
    plain = _module(c, eps, momentum, affine, track, case.seed)
    assert torch.equal(masked_instance_norm(norm, case.x, None), plain(case.x))
    norm.eval()
    plain.eval()
    if track:  # running statistics: a per-channel affine map, mask irrelevant
        assert torch.equal(masked_instance_norm(norm, case.x, case.mask), plain(case.x))
    y = masked_instance_norm(norm, case.x, case.mask)
    y2 = masked_instance_norm(norm, case.garbage(), case.mask)
    keep = case.mask.bool().expand_as(y)
    assert torch.equal(y[keep], y2[keep])
    w = norm.weight if affine else None
    b = norm.bias if affine else None
    assert torch.equal(masked_instance_norm_fn(None, case.x, None, None, w, b, True, 0.1, eps),
                       F.instance_norm(case.x, None, None, w, b, True, 0.1, eps))


class _INNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, 2, 1)
        self.n1 = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.c2 = nn.Conv2d(4, 4, 3, 2, 1)

    def forward(self, x):
        return F.instance_norm(self.c2(self.n1(self.c1(x)).relu()))


def test_wrapped_instance_norm_net_satisfies_the_contract():
    check_contract(_INNet())
    check_contract(_INNet(), train=False)  # tracked running stats in eval mode
