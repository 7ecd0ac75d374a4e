"""Masked reductions over space (mean / sum / amax / amin / norm) == the same reduction over the
gathered active sites; reductions over channels stay per-site; one spatial dim alone is refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sparsify.adapters import masked_mean, masked_reduce
from torch import nn

from ._helpers import SETTINGS, cases, check_contract, count_mask_multiplies, per_sample, refusal

TOL = dict(rtol=1e-5, atol=1e-5)

REDUCTIONS = {
    "mean": (lambda v: v.mean(-1), None),
    "sum": (lambda v: v.sum(-1), (torch.sum, 0.0)),
    "amax": (lambda v: v.amax(-1), (torch.amax, float("-inf"))),
    "amin": (lambda v: v.amin(-1), (torch.amin, float("inf"))),
    "norm": (lambda v: torch.linalg.vector_norm(v, 2, -1), (torch.linalg.vector_norm, 0.0)),
}


def _call(name, mask, x, dims, keepdim):
    if name == "mean":
        return masked_mean(mask, x, dims, keepdim)
    fn, fill = REDUCTIONS[name][1]
    masked = masked_reduce(fn, fill)
    if name == "norm":
        return masked(mask, x, 2, dims, keepdim)
    return masked(mask, x, dims, keepdim)


def _plain(name, x, dims, keepdim):
    if name == "mean":
        return x.mean(dims, keepdim=keepdim)
    fn = REDUCTIONS[name][1][0]
    return fn(x, 2, dims, keepdim) if name == "norm" else fn(x, dims, keepdim)


@SETTINGS
@given(case=cases(), name=st.sampled_from(sorted(REDUCTIONS)),
       dims=st.sampled_from([(2, 3), (-1, -2), (3, 2), (1, 2, 3)]), keepdim=st.booleans())
def test_spatial_reduction_equals_gathered_reference(case, name, dims, keepdim):
    """Per sample (and channel, unless C is reduced too) the reduction of the gathered active
    values; masked sites never matter; mask=None is the plain reduction."""
    y = _call(name, case.mask, case.x, dims, keepdim)
    ref = REDUCTIONS[name][0]
    over_channels = 1 in dims
    expected = []
    for b in range(case.x.shape[0]):
        active = per_sample(case.x, case.mask, b)  # (C, n)
        expected.append(ref(active.reshape(1, -1))[0] if over_channels else ref(active))
    expected = torch.stack(expected)
    assert y.shape == _plain(name, case.x, dims, keepdim).shape
    torch.testing.assert_close(y.reshape(expected.shape), expected, **TOL)
    assert torch.equal(_call(name, case.mask, case.garbage(), dims, keepdim), y)
    assert torch.equal(_call(name, None, case.x, dims, keepdim), _plain(name, case.x, dims, keepdim))


@SETTINGS
@given(case=cases(), dtype=st.sampled_from([None, torch.float64]))
def test_mean_dtype_argument_and_default_dims(case, dtype):
    y = masked_mean(case.mask, case.x, (2, 3), True, dtype=dtype)
    assert y.dtype == (dtype or case.x.dtype)
    assert torch.equal(masked_mean(None, case.x, (2, 3), True, dtype=dtype),
                       case.x.mean((2, 3), keepdim=True, dtype=dtype))
    # dim=None reduces everything: the mean over every channel of every active site of the batch
    everything = torch.cat([per_sample(case.x, case.mask, b).flatten() for b in range(case.x.shape[0])])
    torch.testing.assert_close(masked_mean(case.mask, case.x), everything.mean(), **TOL)


def test_fully_masked_sample_reduces_to_zero():
    x = torch.randn(2, 3, 4, 5)
    m = torch.ones(2, 1, 4, 5)
    m[1] = 0
    for name in REDUCTIONS:
        y = _call(name, m, x, (2, 3), False)
        assert torch.isfinite(y).all() and torch.equal(y[1], torch.zeros(3)), name


# --- rules ---------------------------------------------------------------------------------------
class _Gate(nn.Module):
    """Squeeze-excitation style gates from several global statistics of a dirty feature map."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.c1 = nn.Conv2d(3, 6, 3, 2, 1)
        self.fc = nn.Linear(6, 6)
        self.c2 = nn.Conv2d(6, 6, 3, 2, 1)

    def forward(self, x):
        y = self.c1(x)
        if self.how == "mean":
            s = y.mean((2, 3))
        elif self.how == "torch.mean":
            s = torch.mean(y, dim=[-1, -2], keepdim=True).flatten(1)
        elif self.how == "amax":
            s = y.amax(dim=(2, 3))
        elif self.how == "sum":  # y is dirty: the sum needs its mask too
            s = torch.sum(y, (2, 3))
        elif self.how == "norm":
            s = torch.linalg.vector_norm(y.relu(), 2, (2, 3))
        else:  # "channel mean": per site, keeps the map; no global statistic
            return self.c2(y * torch.sigmoid(y.mean(1, keepdim=True)))
        return self.c2(y * torch.sigmoid(self.fc(s))[:, :, None, None])


@pytest.mark.parametrize("how", ["mean", "torch.mean", "amax", "sum", "norm", "channel mean"])
def test_global_statistics_in_a_network_satisfy_the_contract(how):
    """The gate sees active sites only (canvas invariance would fail otherwise)."""
    check_contract(_Gate(how))


def test_sum_of_a_zero_map_needs_no_adapter():
    """norm of relu(conv(x)) after masking: relu keeps zeros, so the norm runs unchanged; the sum
    of a dirty map is masked."""
    names = {}
    for how in ("norm", "sum"):
        enc = check_contract(_Gate(how))
        names[how] = {getattr(n.target, "__name__", "") for n in enc.graph.nodes if n.op == "call_function"}
    assert "masked_vector_norm" not in names["norm"]
    assert "masked_sum" in names["sum"]


class _OneDim(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, 2, 1)
        self.c2 = nn.Conv2d(6, 6, 3, 2, 1)

    def forward(self, x):
        y = self.c1(x)
        return self.c2(y * torch.sigmoid(y.mean(3, keepdim=True)))


def test_reduction_over_one_spatial_dim_is_refused_by_name():
    message = refusal(_OneDim())
    assert "node 'mean'" in message and "one spatial dim" in message


class _ChannelMean(nn.Module):
    def __init__(self, exp: bool):
        super().__init__()
        self.exp = exp
        self.c1 = nn.Conv2d(1, 6, 3, 2, 1)
        self.c2 = nn.Conv2d(6, 6, 3, 2, 1)

    def forward(self, x):
        y = x.exp() if self.exp else x
        return self.c2(self.c1(y.mean(1, keepdim=True)))


def test_channel_reduction_keeps_zero():
    """A mean over channels of a zero map stays zero at masked sites (c1 needs no mask multiply);
    of exp(x) (1 at masked sites) it does not."""
    plain = check_contract(_ChannelMean(exp=False))
    shifted = check_contract(_ChannelMean(exp=True))
    assert count_mask_multiplies(shifted) == count_mask_multiplies(plain) + 1


# --- var / std / var_mean / std_mean over space (EvoNorm, hand-written group and instance norms) ---
def _moment_call(fn, x, dims, correction, keepdim, mask=None):
    """Call ``fn`` (torch.var, torch.std, ...) or its masked version with ``correction``."""
    from sparsify.adapters.reduce import masked_var

    if mask is None:
        return fn(x, dims, correction=correction, keepdim=keepdim)
    with_mean = fn in (torch.var_mean, torch.std_mean)
    return masked_var(mask, x, dims, correction, keepdim, with_mean=with_mean,
                      root=fn in (torch.std, torch.std_mean))


@SETTINGS
@given(case=cases(max_b=3, max_hw=6), fn=st.sampled_from([torch.var, torch.std, torch.var_mean, torch.std_mean]),
       dims=st.sampled_from([(2, 3), (-1, -2), (1, 2, 3), (0, 2, 3)]), correction=st.sampled_from([0, 1]),
       keepdim=st.booleans())
def test_moments_over_space_equal_gathered_reference(case, fn, dims, correction, keepdim):
    """Per sample and channel (over channels too, or over the batch too, when those dims are reduced):
    the moment of the gathered active values with torch's correction; 0 where n <= correction;
    masked sites never matter; mask=None is the plain op."""
    x64 = case.x.double()
    y = _moment_call(fn, x64, dims, correction, keepdim, case.mask)
    plain = _moment_call(fn, x64, dims, correction, keepdim)
    ys, plains = (y, plain) if isinstance(y, tuple) else ((y,), (plain,))
    assert [t.shape for t in ys] == [t.shape for t in plains]
    b, c = case.x.shape[:2]
    groups = ([per_sample(x64, case.mask, i).reshape(1, -1) for i in range(b)] if 1 in dims else
              [torch.cat([per_sample(x64, case.mask, i) for i in range(b)], 1)] if 0 in dims else
              [per_sample(x64, case.mask, i) for i in range(b)])
    values = [torch.var(g, -1, correction=correction) if g.shape[-1] > correction else torch.zeros(g.shape[0],
              dtype=torch.float64) for g in groups]
    expected = torch.stack(values)
    if fn in (torch.std, torch.std_mean):
        expected = expected.sqrt()
    torch.testing.assert_close(ys[0].reshape(expected.shape), expected, rtol=1e-9, atol=1e-9)
    if len(ys) == 2:
        means = torch.stack([g.mean(-1) for g in groups])
        torch.testing.assert_close(ys[1].reshape(means.shape), means, rtol=1e-9, atol=1e-9)
    garbage = _moment_call(fn, case.garbage().double(), dims, correction, keepdim, case.mask)
    for a, g in zip(ys, garbage if isinstance(garbage, tuple) else (garbage,)):
        torch.testing.assert_close(g, a, rtol=1e-9, atol=1e-9)
    # mask=None: the registered replacement is the plain op itself (NaN where torch gives NaN)
    from sparsify.adapters.reduce import _var_impl

    unmasked = _var_impl(fn, fn in (torch.var_mean, torch.std_mean), fn in (torch.std, torch.std_mean))(
        None, x64, dims, correction=correction, keepdim=keepdim)
    for a, p in zip(unmasked if isinstance(unmasked, tuple) else (unmasked,), plains):
        torch.testing.assert_close(a, p, rtol=0, atol=0, equal_nan=True)


def test_moments_of_an_empty_or_one_site_region_are_zero_not_nan():
    x = torch.randn(3, 2, 4, 5, requires_grad=True)
    m = torch.zeros(3, 1, 4, 5)
    m[1, 0, 2, 3] = 1  # one active site: the unbiased variance is undefined
    m[2] = 1
    from sparsify.adapters.reduce import masked_var

    for root in (False, True):
        y = masked_var(m, x, (2, 3), 1, False, root=root)
        assert torch.equal(y[:2], torch.zeros(2, 2)) and torch.isfinite(y).all()
        y[2].sum().backward()
        assert torch.isfinite(x.grad).all() and torch.equal(x.grad[:2], torch.zeros(2, 2, 4, 5))
        x.grad = None


class _HandNorm(nn.Module):
    """Hand-written normalisations with torch's var/std spellings on a dirty conv output."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.c1 = nn.Conv2d(3, 8, 3, 2, 1)
        self.c2 = nn.Conv2d(8, 8, 3, 2, 1)

    def forward(self, x):
        y = self.c1(x)
        b, c, h, w = y.shape
        if self.how == "instance var":  # timm's instance_std
            s = y.float().var(dim=(2, 3), unbiased=False, keepdim=True).add(1e-5).sqrt().expand(y.shape)
        elif self.how == "group var 5-d":  # timm's group_std
            g = y.reshape(b, 4, c // 4, h, w)
            s = g.var(dim=(2, 3, 4), keepdim=True).add(1e-5).sqrt().expand(g.shape).reshape(b, c, h, w)
        elif self.how == "group var flat":  # timm's group_std(flatten=True)
            g = y.reshape(b, 2, -1)
            s = torch.var(g, dim=-1, correction=0, keepdim=True).add(1e-5).sqrt().expand(g.shape).reshape(b, c, h, w)
        elif self.how == "std_mean":
            std, mean = torch.std_mean(y, dim=(1, 2, 3), keepdim=True)
            return self.c2((y - mean) / (std + 1e-5))
        elif self.how == "group norm paper":  # the GroupNorm paper's code (Wu & He, 2018), with an odd width
            g = y.view(b, 4, -1)
            mean, var = g.mean(-1, keepdim=True), g.var(-1, keepdim=True)
            return self.c2((((g - mean) / (var + 1e-5).sqrt()).view(b, c, h, w)).relu())
        else:  # "var_mean flat": a hand-written GroupNorm (one group per channel), back to a map
            var, mean = torch.var_mean(y.view(b, c, -1), -1, keepdim=True)
            return self.c2(((y.view(b, c, -1) - mean) / (var + 1e-5).sqrt()).view(b, c, h, w))
        return self.c2(y / s)


@pytest.mark.parametrize("how", ["instance var", "group var 5-d", "group var flat", "std_mean", "var_mean flat",
                                 "group norm paper"])
def test_hand_written_norms_satisfy_the_contract(how):
    """Statistics over every spatial site (and channel groups) are over active sites only."""
    enc = check_contract(_HandNorm(how))
    assert any("masked_" in getattr(n.target, "__name__", "") for n in enc.graph.nodes)


class _PartVar(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, 2, 1)
        self.c2 = nn.Conv2d(6, 6, 3, 2, 1)

    def forward(self, x):
        y = self.c1(x)
        return self.c2(y / (y.var(3, keepdim=True) + 1e-5))


def test_variance_over_part_of_space_is_refused_by_name():
    message = refusal(_PartVar())
    assert "node 'var'" in message and "part of space" in message


class _Transposed(nn.Module):
    """Statistics in the flat layout, then the flat axis read back with height and width swapped."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, 2, 1)
        self.c2 = nn.Conv2d(6, 6, 3, 2, 1)

    def forward(self, x):
        y = self.c1(x)
        b, c, h, w = y.shape
        t = y.flatten(2)
        t = t - t.mean(-1, keepdim=True)
        return self.c2(t.view(b, c, w, h).transpose(2, 3))


def test_flat_positions_read_back_in_another_order_are_refused():
    """Only the exact split that flattened the sites restores the map (16 x 24 input: h != w)."""
    message = refusal(_Transposed())
    assert "node 'flatten'" in message and "merges or splits" in message and "not a pooling" in message
