"""The mask-aware norms and pools in 1-D and 3-D equal gather-based references, in float64.

One implementation serves every spatial rank; these properties draw signals (B, C, L) and volumes
(B, C, D, H, W) with random masks (any density, per site, as the adapters receive them inside an
encoder) and compare against references that gather the active sites explicitly
(:mod:`sparsify.testing`'s ``gather_active``, ``reference_batch_norm``, ``reference_instance_norm``,
``reference_group_norm``) or enumerate every pooling window with ``unfold``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from sparsify.adapters.batch_norm import _zeroed_module
from sparsify.adapters.group_norm import masked_group_norm
from sparsify.adapters.instance_norm import masked_instance_norm
from sparsify.adapters.pool import masked_avg_pool, masked_max_pool
from torch import nn

from sparsify.testing import (
    assert_matches_reference,
    gather_active,
    reference_batch_norm,
    reference_group_norm,
    reference_instance_norm,
)

from ._helpers import SETTINGS

_BN = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}
_IN = {1: nn.InstanceNorm1d, 3: nn.InstanceNorm3d}
_MAX = {1: nn.MaxPool1d, 3: nn.MaxPool3d}
_AVG = {1: nn.AvgPool1d, 3: nn.AvgPool3d}
_ADAPTIVE = {("max", 1): nn.AdaptiveMaxPool1d, ("max", 3): nn.AdaptiveMaxPool3d,
             ("avg", 1): nn.AdaptiveAvgPool1d, ("avg", 3): nn.AdaptiveAvgPool3d}


@st.composite
def nd_cases(draw, min_active: int = 1, min_size: int = 1, channels: int | None = None):
    """(x float64 (B, C, *spatial), mask float 0/1 (B, 1, *spatial)) for rank 1 or 3, with at least
    ``min_active`` active sites per sample (clipped to the map size)."""
    rank = draw(st.sampled_from([1, 3]))
    b = draw(st.integers(1, 3))
    c = channels if channels is not None else draw(st.integers(1, 5))
    sizes = tuple(draw(st.integers(max(min_size, 2), 12)) for _ in range(1)) if rank == 1 else tuple(
        draw(st.integers(min_size, 4)) for _ in range(3))
    n = 1
    for s in sizes:
        n *= s
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, *sizes, generator=gen, dtype=torch.float64) * draw(st.sampled_from([1.0, 5.0])) + \
        draw(st.sampled_from([0.0, 3.0, -20.0]))
    if draw(st.integers(0, 3)) == 0:
        mask = torch.ones(b, 1, *sizes, dtype=torch.float64)
    else:
        bits = torch.tensor(draw(st.lists(st.booleans(), min_size=b * n, max_size=b * n))).view(b, n)
        for i in range(b):
            forced = draw(st.lists(st.integers(0, n - 1), min_size=min(min_active, n), max_size=min(min_active, n),
                                   unique=True))
            bits[i, forced] = True
        mask = bits.view(b, 1, *sizes).double()
    return x, mask


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    module = module.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + (0.5 if "var" in name or "weight" in name
                                                                             else -0.5))
    return module


@SETTINGS
@given(case=nd_cases(min_active=2, min_size=2), train=st.booleans(), momentum=st.sampled_from([0.1, 0.7, None]),
       affine=st.booleans(), seed=st.integers(0, 99))
def test_batch_norm_1d_3d_equals_batch_norm_over_gathered_sites(case, train, momentum, affine, seed):
    x, mask = case
    rank, c = x.dim() - 2, x.shape[1]
    bn = _randomised(_BN[rank](c, momentum=momentum, affine=affine), seed).train(train)
    expected_state = copy.deepcopy(bn)
    assert_matches_reference(lambda t, m: _zeroed_module(bn, t, m), reference_batch_norm(bn), x, mask,
                             atol=1e-10, rtol=1e-10)
    if train:  # running statistics move exactly as BatchNorm1d's over the gathered active vectors
        rows = gather_active(x, mask.bool())
        # momentum=None is PyTorch's cumulative average: factor 1 / num_batches_tracked
        factor = momentum if momentum is not None else 1.0 / (int(expected_state.num_batches_tracked) + 1)
        F.batch_norm(rows, expected_state.running_mean, expected_state.running_var, training=True,
                     momentum=factor)
        torch.testing.assert_close(bn.running_mean, expected_state.running_mean, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(bn.running_var, expected_state.running_var, atol=1e-10, rtol=1e-10)


@SETTINGS
@given(case=nd_cases(min_active=2), train=st.booleans(), affine=st.booleans(), track=st.booleans(),
       seed=st.integers(0, 99))
def test_instance_norm_1d_3d_equals_per_sample_gathered_statistics(case, train, affine, track, seed):
    x, mask = case
    assume(x[0, 0].numel() >= 2)  # InstanceNorm itself needs two sites per instance
    rank, c = x.dim() - 2, x.shape[1]
    norm = _randomised(_IN[rank](c, affine=affine, track_running_stats=track), seed).train(train)
    reference = reference_instance_norm(copy.deepcopy(norm))
    assert_matches_reference(lambda t, m: masked_instance_norm(norm, t, m), reference, x, mask,
                             atol=1e-9, rtol=1e-9, zero_at_masked=False)


@SETTINGS
# Two active sites per sample at least: the gathered reference (F.group_norm) needs more than one value
# per group, and a group of one channel at one site has none to spare.
@given(case=nd_cases(min_active=2, min_size=2, channels=6), groups=st.sampled_from([1, 2, 3, 6]),
       seed=st.integers(0, 99))
def test_group_norm_1d_3d_equals_per_sample_gathered_statistics(case, groups, seed):
    x, mask = case
    gn = _randomised(nn.GroupNorm(groups, 6), seed)
    assert_matches_reference(lambda t, m: masked_group_norm(gn, t, m), reference_group_norm(gn), x, mask,
                             atol=1e-9, rtol=1e-9, zero_at_masked=False)


def _windows(t: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Every pooling window of (B, C, *spatial) ``t`` as (B, C, *out, kernel ** rank)."""
    rank = t.dim() - 2
    for d in range(2, 2 + rank):
        t = t.unfold(d, kernel, stride)
    return t.flatten(-rank)


@SETTINGS
@given(case=nd_cases(min_active=0, min_size=2), kind=st.sampled_from(["max", "avg"]),
       window=st.sampled_from([(2, 2), (2, 1), (3, 2)]))
def test_pools_1d_3d_reduce_over_the_active_sites_of_each_window(case, kind, window):
    x, mask = case
    rank = x.dim() - 2
    kernel, stride = window
    if min(x.shape[2:]) < kernel:
        kernel = stride = 1
    pool = (_MAX if kind == "max" else _AVG)[rank](kernel, stride)
    out = (masked_max_pool if kind == "max" else masked_avg_pool)(pool, x, mask)
    values, active = _windows(x, kernel, stride), _windows(mask.expand_as(x), kernel, stride).bool()
    if kind == "max":
        expected = torch.where(active, values, -torch.inf).amax(-1)
        expected = torch.where(active.any(-1), expected, 0.0)
    else:
        expected = (values * active).sum(-1) / active.sum(-1).clamp_min(1)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@SETTINGS
@given(case=nd_cases(min_active=0), kind=st.sampled_from(["max", "avg"]))
def test_global_pools_1d_3d_reduce_over_the_gathered_active_sites(case, kind):
    x, mask = case
    rank, b, c = x.dim() - 2, x.shape[0], x.shape[1]
    pool = _ADAPTIVE[(kind, rank)](1)
    out = (masked_max_pool if kind == "max" else masked_avg_pool)(pool, x, mask)
    assert out.shape == (b, c) + (1,) * rank
    m = mask[:, 0].bool()
    for i in range(b):
        rows = x[i].movedim(0, -1)[m[i]]  # (n_active, C)
        if rows.shape[0] == 0:
            expected = torch.zeros(c, dtype=x.dtype)
        else:
            expected = rows.amax(0) if kind == "max" else rows.mean(0)
        torch.testing.assert_close(out[i].flatten(), expected, atol=1e-12, rtol=1e-12)
