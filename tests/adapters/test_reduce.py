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
