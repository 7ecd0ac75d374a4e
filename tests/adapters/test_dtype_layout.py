"""Every adapter runs on bf16 channels_last inputs under CPU autocast and matches its fp32 result
(computed from the same bf16-rounded values) within bf16 tolerance; running statistics stay fp32."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from sparsify.adapters import (
    masked_batch_norm,
    masked_batch_norm_fn,
    masked_group_norm,
    masked_group_norm_fn,
    masked_instance_norm,
    masked_instance_norm_fn,
    masked_layer_norm,
    masked_layer_norm_fn,
    masked_mean,
    masked_reduce,
)
from sparsify.adapters.interpolate import masked_interpolate
from sparsify.adapters.pool import masked_avg_pool, masked_avg_pool_fn, masked_max_pool, masked_max_pool_fn
from torch import nn

from ._helpers import FEW, cases, per_sample, rows, stat_atol

C = 6


def _init(module: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return module


def _bn_fn(x, m):
    rm, rv = torch.zeros(C), torch.ones(C)
    w, b = torch.linspace(0.5, 1.5, C), torch.linspace(-1, 1, C)
    return masked_batch_norm_fn(m, x, rm, rv, w, b, True, 0.1, 1e-5), rm, rv


def _timm_bn_act():
    norm_act = pytest.importorskip("timm.layers.norm_act")
    return _init(norm_act.BatchNormAct2d(C, act_layer=nn.SiLU))


MODULES = {  # name: (module factory, masked call)
    "batch_norm": (lambda hw: _init(nn.BatchNorm2d(C)), masked_batch_norm),
    "batch_norm_act": (lambda hw: _timm_bn_act(), masked_batch_norm),
    "group_norm": (lambda hw: _init(nn.GroupNorm(3, C)), masked_group_norm),
    "instance_norm": (lambda hw: _init(nn.InstanceNorm2d(C, affine=True, track_running_stats=True)),
                      masked_instance_norm),
    "layer_norm": (lambda hw: _init(nn.LayerNorm((C, *hw))), masked_layer_norm),
    "max_pool": (lambda hw: nn.MaxPool2d(3, 2, 1), masked_max_pool),
    "avg_pool": (lambda hw: nn.AvgPool2d(3, 2, 1, ceil_mode=True), masked_avg_pool),
    "global_max_pool": (lambda hw: nn.AdaptiveMaxPool2d(1), masked_max_pool),
    "adaptive_avg_pool": (lambda hw: nn.AdaptiveAvgPool2d((2, 1)), masked_avg_pool),
    "upsample_bilinear": (lambda hw: nn.Upsample(scale_factor=2, mode="bilinear"), masked_avg_pool),
}
FUNCTIONS = {
    "batch_norm_fn": _bn_fn,
    "mean": lambda x, m: masked_mean(m, x, (2, 3)),
    "sum": lambda x, m: masked_reduce(torch.sum, 0.0)(m, x, (2, 3), True),
    "amax": lambda x, m: masked_reduce(torch.amax, float("-inf"))(m, x, (-1, -2)),
    "amin": lambda x, m: masked_reduce(torch.amin, float("inf"))(m, x, (2, 3)),
    "norm": lambda x, m: masked_reduce(torch.linalg.vector_norm, 0.0)(m, x, 2, (2, 3)),
    "interpolate": lambda x, m: masked_interpolate(m, x, scale_factor=2, mode="bilinear"),
    "group_norm_fn": lambda x, m: masked_group_norm_fn(m, x, 2, torch.linspace(0.5, 1.5, C), torch.zeros(C)),
    "instance_norm_fn": lambda x, m: masked_instance_norm_fn(m, x),
    "layer_norm_fn": lambda x, m: masked_layer_norm_fn(m, x, x.shape[1:]),
    "max_pool_fn": lambda x, m: masked_max_pool_fn(F.max_pool2d)(m, x, 2, 2, ceil_mode=True),
    "avg_pool_fn": lambda x, m: masked_avg_pool_fn(F.avg_pool2d)(m, x, 3, 1, 1),
}


def _conditioning(x, mask, eps: float = 1e-5) -> float:
    """max |mean| / std over the statistics the norms take (per channel, sample, instance)."""
    groups = [rows(x, mask)[:, c] for c in range(x.shape[1])]
    for b in range(x.shape[0]):
        groups += [per_sample(x, mask, b), *per_sample(x, mask, b)]
    return max(float(g.mean().abs() / (g.var(unbiased=False) + eps).sqrt()) for g in groups)


def _outputs(result):
    return list(result) if isinstance(result, tuple) else [result]


@pytest.mark.parametrize("name", sorted(MODULES) + sorted(FUNCTIONS))
@FEW
@given(case=cases(channels=C, min_hw=2, max_offset=2.0))
def test_bf16_autocast_channels_last_matches_fp32(name, case):
    x16 = case.x.bfloat16()
    x_cl = x16.contiguous(memory_format=torch.channels_last)
    mask_cl = case.mask.contiguous(memory_format=torch.channels_last)
    if name in MODULES:
        make, masked = MODULES[name]
        module = make(case.x.shape[-2:]).train()
        twin = copy.deepcopy(module)

        def run(mod, x, m):
            return [masked(mod, x, m), *[b.clone() for b in mod.buffers()]]

        expected = run(module, x16.float(), case.mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = run(twin, x_cl, mask_cl)
        for buffer in twin.buffers():
            assert buffer.dtype in (torch.float32, torch.int64)  # running stats stay fp32
    else:
        fn = FUNCTIONS[name]
        expected = _outputs(fn(x16.float(), case.mask))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = _outputs(fn(x_cl, mask_cl))
    # Normalising in bf16 (x * scale + shift) rounds terms of size |mean| / std: the tolerance grows
    # with the worst-conditioned statistic (a few close values, as PyTorch's own bf16 norms do).
    conditioning = _conditioning(x16.float(), case.mask) if "norm" in name else 0.0
    for e, g in zip(expected, got):
        e, g = e.detach(), g.detach()
        assert g.shape == e.shape and g.dtype in (torch.bfloat16, torch.float32, torch.int64)
        if e.is_floating_point():
            assert torch.isfinite(g).all()
            scale = float(e.abs().amax().clamp_min(1.0))
            torch.testing.assert_close(g.float(), e, rtol=2e-2, atol=2e-2 * scale + 2**-8 * conditioning)
        else:
            assert torch.equal(g, e)


@FEW
@given(case=cases(channels=C, min_hw=2))
def test_channels_last_fp32_is_exact_layout_independent(case):
    """The same fp32 values in channels_last layout give the same result (to rounding)."""
    x_cl = case.x.contiguous(memory_format=torch.channels_last)
    # sums in another order: rounding, amplified by the worst-conditioned statistic (see stat_atol)
    groups = [rows(case.x, case.mask)[:, c] for c in range(C)]
    for b in range(case.x.shape[0]):
        groups += [per_sample(case.x, case.mask, b), *per_sample(case.x, case.mask, b)]
    tol = dict(rtol=1e-5, atol=stat_atol(groups, 1e-5, 1e-5) * 4)
    for name, fn in FUNCTIONS.items():
        for e, g in zip(_outputs(fn(case.x, case.mask)), _outputs(fn(x_cl, case.mask))):
            torch.testing.assert_close(g, e, **tol, msg=lambda m, name=name: f"{name}: {m}")
    for name, (make, masked) in MODULES.items():
        module = make(case.x.shape[-2:]).train()
        twin = copy.deepcopy(module)
        torch.testing.assert_close(masked(twin, x_cl, case.mask), masked(module, case.x, case.mask),
                                   **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_bf16_batch_norm_with_large_mean():
    """Activations with |mean| = 16 std: the masked BN's bf16 error stays within that of PyTorch's
    own bf16 BatchNorm on the same values (both grow with |mean| / std)."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, C, 8, 8, generator=gen) * 0.5 + 8).bfloat16()
    m = (torch.rand(4, 1, 8, 8, generator=gen) > 0.4).float()
    bn = _init(nn.BatchNorm2d(C))
    expected = masked_batch_norm(copy.deepcopy(bn), x.float(), m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = masked_batch_norm(bn, x.contiguous(memory_format=torch.channels_last), m)
    keep = m.bool().expand_as(expected)
    plain = F.batch_norm(x, None, None, bn.weight, bn.bias, True).float()  # error of dense bf16 BN
    dense_error = (plain - F.batch_norm(x.float(), None, None, bn.weight, bn.bias, True)).abs().max()
    assert (got.float() - expected)[keep].abs().max() <= max(4 * dense_error, 3e-2)
