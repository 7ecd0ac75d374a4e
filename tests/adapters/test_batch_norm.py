"""Masked BatchNorm == BatchNorm1d over the gathered (N_active, C) matrix of active feature vectors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from sparsify.adapters import masked_batch_norm, masked_batch_norm_fn
from torch import nn

from ._helpers import FEW, SETTINGS, cases, check_contract, rows, stat_atol

timm_norm_act = pytest.importorskip("timm.layers.norm_act")

TOL = dict(rtol=1e-4, atol=1e-4)


def _pair(cls, c: int, momentum, eps: float, affine: bool, track: bool, seed: int):
    """A randomly initialised BatchNorm of class ``cls`` and a BatchNorm1d copy of it."""
    bn = cls(c, eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if affine:
            bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=gen))
        if track:
            bn.running_mean.copy_(torch.randn(c, generator=gen))
            bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            bn.num_batches_tracked.fill_(3)
    ref = nn.BatchNorm1d(c, eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    ref.load_state_dict(bn.state_dict())
    return bn, ref


def _tol(active_rows: torch.Tensor, eps: float) -> dict:
    """Tolerance for outputs normalised with these (N, C) rows' statistics (see stat_atol)."""
    return dict(rtol=1e-4, atol=stat_atol(active_rows.T, eps))


def _assert_same_buffers(bn: nn.Module, ref: nn.Module, active_rows: torch.Tensor | None = None) -> None:
    # one-pass moments: the variance is good to about mean^2 * 2^-24 (absolute)
    atol = 1e-4 if active_rows is None else 1e-4 + 4e-7 * float(active_rows.detach().mean(0).square().max())
    for (name, a), (_, b) in zip(bn.named_buffers(), ref.named_buffers()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=atol, msg=name)
        else:
            assert torch.equal(a, b), name


norm_params = dict(
    cls=st.sampled_from([nn.BatchNorm2d, nn.SyncBatchNorm]),
    momentum=st.sampled_from([0.1, 0.5, 1.0, None]),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    affine=st.booleans(),
    track=st.booleans(),
)


@SETTINGS
@given(case=cases(), **norm_params)
def test_train_equals_batchnorm1d_on_gathered_rows(case, cls, momentum, eps, affine, track):
    """Two training steps (a second input under the same mask): outputs at active sites, running
    mean/var and num_batches_tracked all follow BatchNorm1d on the gathered active rows, including
    the cumulative-average mode (momentum=None)."""
    assume(case.mask.sum() >= 2)  # BatchNorm1d needs two values per channel
    bn, ref = _pair(cls, case.x.shape[1], momentum, eps, affine, track, case.seed)
    bn.train()
    ref.train()
    for x in (case.x, case.x * 1.5 - 0.5):
        y = masked_batch_norm(bn, x, case.mask)
        expected = ref(rows(x, case.mask))
        torch.testing.assert_close(rows(y, case.mask), expected, **_tol(rows(x, case.mask), eps))
        _assert_same_buffers(bn, ref, rows(x, case.mask))


@SETTINGS
@given(case=cases(), **norm_params)
def test_no_mask_and_eval_equal_plain_batchnorm(case, cls, momentum, eps, affine, track):
    """mask=None is the module itself (train mode, buffers included); eval mode with running
    statistics ignores the mask (a per-channel affine map)."""
    bn, _ = _pair(cls, case.x.shape[1], momentum, eps, affine, track, case.seed)
    plain, _ = _pair(cls, case.x.shape[1], momentum, eps, affine, track, case.seed)
    bn.train()
    plain.train()
    if case.x.shape[0] * case.x.shape[2] * case.x.shape[3] > 1:
        assert torch.equal(masked_batch_norm(bn, case.x, None), plain(case.x))
        for a, b in zip(bn.buffers(), plain.buffers()):
            assert torch.equal(a, b)
    bn.eval()
    plain.eval()
    if track:
        assert torch.equal(masked_batch_norm(bn, case.x, case.mask), plain(case.x))


@SETTINGS
@given(case=cases(), **norm_params)
def test_masked_sites_do_not_matter(case, cls, momentum, eps, affine, track):
    """Garbage at masked sites changes neither the outputs at active sites nor the running stats."""
    bn, _ = _pair(cls, case.x.shape[1], momentum, eps, affine, track, case.seed)
    other, _ = _pair(cls, case.x.shape[1], momentum, eps, affine, track, case.seed)
    y = masked_batch_norm(bn, case.x, case.mask)
    y2 = masked_batch_norm(other, case.garbage(), case.mask)
    assert torch.equal(rows(y, case.mask), rows(y2, case.mask))
    for a, b in zip(bn.buffers(), other.buffers()):
        assert torch.equal(a, b)


@SETTINGS
@given(case=cases(), eps=st.sampled_from([1e-5, 1e-2]), affine=st.booleans())
def test_backward_equals_gathered_reference(case, eps, affine):
    """Gradients w.r.t. input (every site), weight and bias equal autograd through BatchNorm1d on
    the gathered rows; masked sites get exactly zero gradient."""
    assume(case.mask.sum() >= 2)
    bn, ref = _pair(nn.BatchNorm2d, case.x.shape[1], 0.1, eps, affine, True, case.seed)
    gen = torch.Generator().manual_seed(case.seed + 2)
    x = case.x.clone().requires_grad_()
    x_ref = case.x.clone().requires_grad_()
    y = rows(masked_batch_norm(bn, x, case.mask), case.mask)
    expected = ref(rows(x_ref, case.mask))
    g = torch.randn(expected.shape, generator=gen)
    (y * g).sum().backward()
    (expected * g).sum().backward()
    # The input gradient is a difference of terms of size rstd * |g| (it vanishes with two rows):
    # the tolerance scales with them, not with the result.
    active = rows(case.x, case.mask)
    terms = float((active.var(0, unbiased=False) + eps).rsqrt().max() * g.abs().max())
    tol = dict(rtol=1e-4, atol=stat_atol(active.T, eps) * (1 + terms))
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    assert torch.equal(x.grad * (1 - case.mask), torch.zeros_like(x.grad))
    if affine:
        torch.testing.assert_close(bn.weight.grad, ref.weight.grad, **tol)
        torch.testing.assert_close(bn.bias.grad, ref.bias.grad, **tol)


@SETTINGS
@given(case=cases(), momentum=st.sampled_from([0.1, 0.7]), eps=st.sampled_from([1e-5, 1e-2]),
       affine=st.booleans(), training=st.booleans())
def test_functional_equals_f_batch_norm_on_gathered_rows(case, momentum, eps, affine, training):
    """masked_batch_norm_fn == F.batch_norm on the gathered rows (running buffers updated alike);
    with mask=None it is F.batch_norm itself."""
    assume(case.mask.sum() >= 2)
    c = case.x.shape[1]
    gen = torch.Generator().manual_seed(case.seed)
    weight = torch.rand(c, generator=gen) + 0.5 if affine else None
    bias = torch.randn(c, generator=gen) if affine else None
    rm, rv = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y = masked_batch_norm_fn(case.mask, case.x, rm, rv, weight, bias, training, momentum, eps)
    expected = F.batch_norm(rows(case.x, case.mask), rm_ref, rv_ref, weight, bias, training, momentum, eps)
    tol = _tol(rows(case.x, case.mask), eps) if training else TOL
    torch.testing.assert_close(rows(y, case.mask), expected, **tol)
    torch.testing.assert_close(rm, rm_ref, **TOL)
    torch.testing.assert_close(rv, rv_ref, **tol)
    plain_rm, plain_rv = rm.clone(), rv.clone()
    if training and case.x.shape[0] * case.x.shape[2] * case.x.shape[3] == 1:
        return  # F.batch_norm refuses one value per channel in training
    assert torch.equal(masked_batch_norm_fn(None, case.x, rm, rv, weight, bias, training, momentum, eps),
                       F.batch_norm(case.x, plain_rm, plain_rv, weight, bias, training, momentum, eps))
    assert torch.equal(rm, plain_rm) and torch.equal(rv, plain_rv)


class _Double(nn.Module):
    """A deterministic stand-in for timm's drop layer, so its presence is observable."""

    def forward(self, x):
        return x * 2


@FEW
@given(case=cases(), act=st.sampled_from([nn.ReLU, nn.SiLU, nn.Identity]), with_drop=st.booleans())
def test_timm_batchnorm_act_keeps_drop_and_activation(case, act, with_drop):
    """timm's BatchNormAct2d: masked path == act(drop(BatchNorm1d(rows))); mask=None == module."""
    assume(case.mask.sum() >= 2)
    c = case.x.shape[1]
    module = timm_norm_act.BatchNormAct2d(c, act_layer=act, drop_layer=_Double if with_drop else None)
    ref = nn.BatchNorm1d(c)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
    ref.load_state_dict(module.state_dict())
    module.train()
    y = masked_batch_norm(module, case.x, case.mask)
    expected = act()(ref(rows(case.x, case.mask)) * (2 if with_drop else 1))
    torch.testing.assert_close(rows(y, case.mask), expected, **_tol(rows(case.x, case.mask), module.eps))
    _assert_same_buffers(module, ref, rows(case.x, case.mask))
    module.eval()
    assert torch.equal(masked_batch_norm(module, case.x, case.mask), module(case.x))


@SETTINGS
@given(case=cases(min_hw=2))
def test_fully_masked_sample_is_invisible(case):
    """Appending a sample with no active site changes no other output and no running statistic."""
    bn, _ = _pair(nn.BatchNorm2d, case.x.shape[1], 0.1, 1e-5, True, True, case.seed)
    other, _ = _pair(nn.BatchNorm2d, case.x.shape[1], 0.1, 1e-5, True, True, case.seed)
    y = masked_batch_norm(bn, case.x, case.mask)
    x2 = torch.cat([case.x, torch.randn_like(case.x[:1]) * 9])
    m2 = torch.cat([case.mask, torch.zeros_like(case.mask[:1])])
    y2 = masked_batch_norm(other, x2, m2)
    # the same sums, added in another order: equal to rounding
    torch.testing.assert_close(y2[:-1], y, rtol=1e-5, atol=stat_atol(rows(case.x, case.mask).T, 1e-5, 1e-5))
    for a, b in zip(bn.buffers(), other.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_no_active_site_at_all_keeps_running_stats_and_is_finite():
    bn, _ = _pair(nn.BatchNorm2d, 3, 0.1, 1e-5, True, True, 0)
    before = bn.running_mean.clone(), bn.running_var.clone()
    y = masked_batch_norm(bn, torch.randn(2, 3, 4, 5), torch.zeros(2, 1, 4, 5))
    assert torch.isfinite(y).all()
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])


class _BNNet(nn.Module):
    def __init__(self, norm: nn.Module | None = None, functional: bool = False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, 2, 1)
        self.norm = norm or nn.BatchNorm2d(6)
        self.functional = functional
        self.w = nn.Parameter(torch.rand(6) + 0.5)
        self.b = nn.Parameter(torch.randn(6))
        self.c2 = nn.Conv2d(6, 5, 3, 2, 1)
        self.bn2 = nn.BatchNorm2d(5)

    def forward(self, x):
        y = self.c1(x)
        if self.functional:
            y = F.batch_norm(y, None, None, self.w, self.b, True)
        else:
            y = self.norm(y)
        return self.bn2(self.c2(y.relu()))


@pytest.mark.parametrize("make", [
    lambda: _BNNet(),
    lambda: _BNNet(nn.SyncBatchNorm(6)),
    lambda: _BNNet(timm_norm_act.BatchNormAct2d(6, act_layer=nn.SiLU)),
    lambda: _BNNet(functional=True),
], ids=["BatchNorm2d", "SyncBatchNorm", "BatchNormAct2d", "F.batch_norm"])
def test_wrapped_batchnorm_nets_satisfy_the_contract(make):
    """The rules route every BatchNorm flavour to the masked adapter: zero at masked sites, canvas
    invariance (train-mode statistics ignore the padded masked canvas), dense equality."""
    check_contract(make(), train=True)
