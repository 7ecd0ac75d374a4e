"""Masked pooling == for each output site, max / mean over the active input sites in its window
(a window loop over explicitly gathered sites); windows with no active site give 0."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from sparsify.adapters import masked_average, masked_max
from sparsify.adapters.pool import masked_avg_pool, masked_avg_pool_fn, masked_max_pool, masked_max_pool_fn
from torch import nn

from ._helpers import SETTINGS, cases, check_contract, refusal

TOL = dict(rtol=1e-5, atol=1e-5)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _reduce_window(x, mask, bb, rows, cols, op):
    """max or mean over the active sites among rows x cols of sample ``bb`` (C,), 0 if none."""
    sites = [(r, c) for r in rows for c in cols if mask[bb, 0, r, c] > 0]
    if not sites:
        return torch.zeros(x.shape[1])
    gathered = torch.stack([x[bb, :, r, c] for r, c in sites], 1)  # (C, n)
    return gathered.amax(1) if op == "max" else gathered.mean(1)


def window_reference(x, mask, out_hw, kernel, stride, padding, dilation, op):
    """Strided windows (padding never counts: out-of-range positions are dropped)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(_pair, (kernel, stride, padding, dilation))
    b, c, h, w = x.shape
    out = torch.zeros(b, c, *out_hw)
    for i in range(out_hw[0]):
        rows = [r for r in (i * sh - ph + k * dh for k in range(kh)) if 0 <= r < h]
        for j in range(out_hw[1]):
            cols = [q for q in (j * sw - pw + k * dw for k in range(kw)) if 0 <= q < w]
            for bb in range(b):
                out[bb, :, i, j] = _reduce_window(x, mask, bb, rows, cols, op)
    return out


def adaptive_reference(x, mask, out_hw, op):
    """PyTorch's adaptive windows: [floor(i * H / oh), ceil((i + 1) * H / oh))."""
    b, c, h, w = x.shape
    out = torch.zeros(b, c, *out_hw)
    for i in range(out_hw[0]):
        rows = range(i * h // out_hw[0], math.ceil((i + 1) * h / out_hw[0]))
        for j in range(out_hw[1]):
            cols = range(j * w // out_hw[1], math.ceil((j + 1) * w / out_hw[1]))
            for bb in range(b):
                out[bb, :, i, j] = _reduce_window(x, mask, bb, rows, cols, op)
    return out


@st.composite
def pool_params(draw, dilation: bool):
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2))) if dilation else (1, 1)
    return dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dil,
                ceil_mode=draw(st.booleans()))


def _run_or_skip(fn, *args):
    try:
        return fn(*args)
    except RuntimeError as error:  # the window does not fit the input
        assume("too small" not in str(error) and "Output size" not in str(error))
        raise


@SETTINGS
@given(case=cases(max_c=3), params=pool_params(dilation=True), functional=st.booleans())
def test_max_pool_equals_window_loop(case, params, functional):
    pool = nn.MaxPool2d(**params)
    plain = _run_or_skip(pool, case.x)
    if functional:
        fn = masked_max_pool_fn(F.max_pool2d)
        y = fn(case.mask, case.x, params["kernel_size"], params["stride"], params["padding"],
               params["dilation"], params["ceil_mode"])
        assert torch.equal(fn(None, case.x, **params), plain)
    else:
        y = masked_max_pool(pool, case.x, case.mask)
        assert torch.equal(masked_max_pool(pool, case.x, None), plain)
    p = {k: v for k, v in params.items() if k != "ceil_mode"}
    expected = window_reference(case.x, case.mask, plain.shape[-2:], p["kernel_size"], p["stride"],
                                p["padding"], p["dilation"], "max")
    torch.testing.assert_close(y, expected, **TOL)
    assert torch.equal(masked_max_pool(pool, case.garbage(), case.mask), y)


@SETTINGS
@given(case=cases(max_c=3), params=pool_params(dilation=False), count_include_pad=st.booleans(),
       divisor_override=st.sampled_from([None, 2]), functional=st.booleans())
def test_avg_pool_equals_window_loop(case, params, count_include_pad, divisor_override, functional):
    """The mean over active sites; pools that count padding as zeros count masked sites as zeros."""
    params.pop("dilation")
    extra = dict(count_include_pad=count_include_pad, divisor_override=divisor_override)
    pool = nn.AvgPool2d(**params, **extra)
    plain = _run_or_skip(pool, case.x)
    if functional:
        fn = masked_avg_pool_fn(F.avg_pool2d)
        y = fn(case.mask, case.x, params["kernel_size"], params["stride"], params["padding"],
               params["ceil_mode"], count_include_pad, divisor_override)
        assert torch.equal(fn(None, case.x, **params, **extra), plain)
    else:
        y = masked_avg_pool(pool, case.x, case.mask)
        assert torch.equal(masked_avg_pool(pool, case.x, None), plain)
    if divisor_override is not None or (count_include_pad and max(params["padding"]) > 0):
        expected = pool(case.x * case.mask)  # fixed divisor: masked sites count as zeros, as padding does
    else:
        expected = window_reference(case.x, case.mask, plain.shape[-2:], params["kernel_size"], params["stride"],
                                    params["padding"], 1, "mean")
    torch.testing.assert_close(y, expected, **TOL)
    torch.testing.assert_close(masked_avg_pool(pool, case.garbage(), case.mask), y, **TOL)


@SETTINGS
@given(case=cases(max_c=3), out=st.sampled_from([(1, 1), (2, 3), (3, 1), 1]), op=st.sampled_from(["max", "mean"]))
def test_adaptive_and_global_pools_equal_window_loop(case, out, op):
    """Adaptive pooling (global pooling when the output is 1x1) over active sites only."""
    out_hw = _pair(out)
    assume(out_hw[0] <= case.x.shape[2] and out_hw[1] <= case.x.shape[3])
    cls, masked, generic = ((nn.AdaptiveMaxPool2d, masked_max_pool, masked_max) if op == "max"
                            else (nn.AdaptiveAvgPool2d, masked_avg_pool, masked_average))
    pool = cls(out)
    y = masked(pool, case.x, case.mask)
    torch.testing.assert_close(y, adaptive_reference(case.x, case.mask, out_hw, op), **TOL)
    assert torch.equal(generic(pool, case.x, case.mask), y)
    assert torch.equal(masked(pool, case.x, None), pool(case.x))
    fn_masked = (masked_max_pool_fn(F.adaptive_max_pool2d) if op == "max"
                 else masked_avg_pool_fn(F.adaptive_avg_pool2d))
    torch.testing.assert_close(fn_masked(case.mask, case.garbage(), out), y, **TOL)


def test_fully_masked_input_pools_to_zero():
    x = torch.randn(2, 3, 4, 5)
    m = torch.zeros(2, 1, 4, 5)
    for pool in (nn.MaxPool2d(2), nn.AvgPool2d(3, 1, 1), nn.AdaptiveMaxPool2d(1), nn.AdaptiveAvgPool2d(2)):
        generic = masked_max if "Max" in type(pool).__name__ else masked_average
        y = generic(pool, x, m)
        assert torch.equal(y, torch.zeros_like(y))


# --- rules: which pools get the masked implementation --------------------------------------------
class _StemNet(nn.Module):
    def __init__(self, act: nn.Module, pool: nn.Module):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, 2, 1)
        self.act = act
        self.pool = pool
        self.c2 = nn.Conv2d(6, 6, 3, 2, 1)

    def forward(self, x):
        return self.c2(self.pool(self.act(self.c1(x))))


def _targets(enc):
    return {getattr(n.target, "__name__", n.target) for n in enc.graph.nodes if n.op in ("call_function",
                                                                                         "call_module")}


@pytest.mark.parametrize("act, uses_masked_max", [(nn.ReLU(), False), (nn.Sigmoid(), False), (nn.SiLU(), True),
                                                   (nn.Identity(), True)])
def test_max_pool_rule_skips_the_fill_for_non_negative_inputs(act, uses_masked_max):
    """After ReLU/sigmoid (non-negative) the zeros at masked sites never win: the pool runs as is on
    the zeroed input; otherwise the -inf fill is used. Both satisfy the contract."""
    enc = check_contract(_StemNet(act, nn.MaxPool2d(3, 2, 1)))
    assert ("masked_max_pool" in _targets(enc)) == uses_masked_max


class _FunctionalPools(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, 2, 1)
        self.c2 = nn.Conv2d(6, 6, 3, 2, 1)
        self.fc = nn.Conv2d(6, 6, 1)

    def forward(self, x):
        y = self.c1(x)
        y = F.avg_pool2d(y, 3, 1, 1, False, True) + F.max_pool2d(y.tanh(), 3, 1, 1, 1, True)
        y = self.c2(y)
        return y * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(y, 1) + F.adaptive_max_pool2d(y, (1, 1))))


def test_functional_pools_with_positional_arguments_satisfy_the_contract():
    """Positional ceil_mode / count_include_pad are not mistaken for return_indices (a fixed bug);
    adaptive pools feed a squeeze-excitation gate computed from active sites only."""
    check_contract(_FunctionalPools())


class _IndicesNet(_StemNet):
    def forward(self, x):
        return self.c2(self.pool(self.act(self.c1(x)))[0])


def test_max_pool_with_return_indices_is_refused_by_name():
    message = refusal(_IndicesNet(nn.ReLU(), nn.MaxPool2d(2, return_indices=True)))
    assert "node 'pool'" in message and "return_indices" in message
