"""Masked pooling: max over active sites only, averages over active sites only.

- Max pooling fills masked sites with -inf before pooling; a window with no active site gives 0.
  When the input is known non-negative and zero at masked sites (ReLU before the pool, as in every
  ResNet stem) the zeros can never win over an active value, so the pool runs unchanged.
- Average pooling divides the pooled masked input by the pooled mask: the mean over the active sites
  of each window. A pool that counts padding as zeros (count_include_pad with padding, or a
  divisor_override) counts masked sites as zeros too, so an all-visible mask equals the dense pool.
- Adaptive/global pooling uses the same two tricks; its output has no per-site meaning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._kinds import passthrough_nonspatial
from ._registry import POOLED, Decision, Info, NodeView, Unsupported, register_rule

__all__ = ["masked_max", "masked_average", "masked_max_pool", "masked_avg_pool",
           "masked_max_pool_fn", "masked_avg_pool_fn"]


def masked_max(pool: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """``pool`` (any max-type pooling) over active sites only; all-masked windows give 0."""
    filled = x.masked_fill(mask == 0, float("-inf"))
    out = pool(filled)
    return out.masked_fill(out == float("-inf"), 0.0)


def masked_average(pool: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   mask: torch.Tensor, zero_input: bool = False) -> torch.Tensor:
    """``pool`` (any linear averaging pool) over active sites only; all-masked windows give 0.

    ``zero_input``: ``x`` is already zero at masked sites, so it is pooled as it is. Besides a multiply,
    that spares a saved copy of the map: average pools keep their input for backward.
    """
    m = mask.to(x.dtype)
    num = pool(x if zero_input else x * m)
    den = pool(m)  # (B, 1, h, w): the fraction of active sites per window
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def masked_max_pool(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return module(x) if mask is None else masked_max(module, x, mask)


def _counts_absent_as_zero(count_include_pad: bool, padding, divisor_override) -> bool:
    """Whether a pool divides by a fixed count (padding counted, or an explicit divisor).

    Such a pool already counts absent (padded) sites as zeros, so masked sites are counted the same
    way: the result is pool(x * m), equal to the dense pool when all is visible and unchanged by a
    masked canvas. Otherwise the pool averages present sites only, and so does the masked version.
    """
    pads = padding if isinstance(padding, (tuple, list)) else (padding,)
    return divisor_override is not None or (bool(count_include_pad) and any(p > 0 for p in pads))


def masked_avg_pool(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None,
                    zero_input: bool = False) -> torch.Tensor:
    if mask is None:
        return module(x)
    if _counts_absent_as_zero(getattr(module, "count_include_pad", False), getattr(module, "padding", 0),
                              getattr(module, "divisor_override", None)):
        return module(x if zero_input else x * mask.to(x.dtype))
    return masked_average(module, x, mask, zero_input)


def _avg_pool_of_zeroed(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """:func:`masked_avg_pool` of a map the analysis knows is zero at masked sites."""
    return masked_avg_pool(module, x, mask, zero_input=True)


def masked_max_pool_fn(fn: Callable) -> Callable:
    def masked(mask, input, *args, **kwargs):
        if mask is None:
            return fn(input, *args, **kwargs)
        return masked_max(lambda t: fn(t, *args, **kwargs), input, mask)

    masked.__name__ = f"masked_{getattr(fn, '__name__', 'max_pool')}"
    return masked


def masked_avg_pool_fn(fn: Callable, zero_input: bool = False) -> Callable:
    """Mask-aware ``fn`` (a functional average pool); ``zero_input``: for inputs already zero at masked sites."""
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
    defaults = {"padding": 0, "count_include_pad": True, "divisor_override": None}

    def masked(mask, input, *args, **kwargs):
        if mask is None:
            return fn(input, *args, **kwargs)
        given = {**defaults, **dict(zip(names, args)), **kwargs}
        if _counts_absent_as_zero(given["count_include_pad"], given["padding"], given["divisor_override"]):
            return fn(input if zero_input else input * mask.to(input.dtype), *args, **kwargs)
        return masked_average(lambda t: fn(t, *args, **kwargs), input, mask, zero_input)

    masked.__name__ = f"masked_{getattr(fn, '__name__', 'avg_pool')}{'_of_zeroed' if zero_input else ''}"
    return masked


def _whole_map_kernel(view: NodeView) -> bool:
    """``F.avg_pool2d(x, x.size()[2:])``: a kernel read from the map's own size, i.e. global pooling.

    The kernel is a traced shape value (an fx node), and the pooled output is 1 x 1."""
    if view.module is not None:
        return False
    kernel = view.arg(1, "kernel_size")
    shape = view.shape()
    traced = isinstance(kernel, torch.fx.Node) or (
        isinstance(kernel, (tuple, list)) and any(isinstance(k, torch.fx.Node) for k in kernel))
    return traced and isinstance(shape, torch.Size) and len(shape) > 2 and all(s == 1 for s in shape[2:])


def _excludes_own_padding(view: NodeView) -> bool:
    if view.module is not None:
        padding, include = getattr(view.module, "padding", 0), getattr(view.module, "count_include_pad", True)
    else:
        padding, include = view.arg(3, "padding", 0), view.arg(5, "count_include_pad", True)
    pads = padding if isinstance(padding, (tuple, list)) else (padding,)
    return any(p != 0 for p in pads) and not include


def _pool_rule(masked, kind: str, adaptive: bool, masked_of_zeroed=None):
    """The rule for one pooling op; ``masked_of_zeroed``: the replacement for inputs known zero at masked
    sites (average pools: the input is pooled as it is)."""

    def rule(view: NodeView) -> Decision:
        x = view.arg(0, "input")
        info = view.info(x)
        if info is None or info.spatial is None:
            return passthrough_nonspatial(view)
        if info.spatial != tuple(range(2, len(view.shape(x)))):
            raise Unsupported("pools a feature map that is not in (N, C, *spatial) layout")
        # max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices);
        # adaptive_max_pool2d(input, output_size, return_indices); average pools have none.
        if kind == "max" and (view.module is not None and getattr(view.module, "return_indices", False) or
                              view.module is None and view.arg(6 if not adaptive else 2, "return_indices",
                                                               False)):
            raise Unsupported("max pooling with return_indices")
        replacement = masked_of_zeroed if masked_of_zeroed is not None and info.zero else masked
        if adaptive or _whole_map_kernel(view):
            # The output grid does not line up with the patch grid: treat it as pooled vectors.
            return Decision(out=POOLED, masked=replacement, mask_of=x)
        if info.padded:
            # After an explicit zero pad the model's own border is zeros that count: masked sites are
            # treated alike (run unchanged on the zeroed input), the only way a masked canvas matches.
            if kind == "avg" and _excludes_own_padding(view):
                raise Unsupported("average pool that excludes its own padding, after an explicit zero pad")
            return Decision(out=Info(spatial=info.spatial, zero=False, nonneg=info.nonneg), require_zero=[x])
        if kind == "max" and info.nonneg:
            # Zeros at masked sites never exceed a non-negative active value: zero them (one
            # multiply, often needed anyway) and run the pool as is.
            return Decision(out=Info(spatial=info.spatial, zero=False, nonneg=True), require_zero=[x])
        return Decision(out=Info(spatial=info.spatial, zero=False, nonneg=info.nonneg),
                        masked=replacement, mask_of=x)

    return rule


# The same two tricks in every spatial rank: one rule per kind, registered for the 1-D, 2-D and 3-D ops.
for _cls in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d):
    register_rule(_cls, _pool_rule(masked_max_pool, "max", adaptive=False))
for _cls in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d):
    register_rule(_cls, _pool_rule(masked_avg_pool, "avg", adaptive=False, masked_of_zeroed=_avg_pool_of_zeroed))
for _cls in (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d):
    register_rule(_cls, _pool_rule(masked_max_pool, "max", adaptive=True))
for _cls in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d):
    register_rule(_cls, _pool_rule(masked_avg_pool, "avg", adaptive=True, masked_of_zeroed=_avg_pool_of_zeroed))
for _fn in (F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d):
    register_rule(_fn, _pool_rule(masked_max_pool_fn(_fn), "max", adaptive=False))
for _fn in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.avg_pool1d, torch._C._nn.avg_pool2d,
            torch._C._nn.avg_pool3d):
    register_rule(_fn, _pool_rule(masked_avg_pool_fn(_fn), "avg", adaptive=False,
                                  masked_of_zeroed=masked_avg_pool_fn(_fn, zero_input=True)))
for _fn in (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d):
    register_rule(_fn, _pool_rule(masked_max_pool_fn(_fn), "max", adaptive=True))
for _fn in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d):
    register_rule(_fn, _pool_rule(masked_avg_pool_fn(_fn), "avg", adaptive=True,
                                  masked_of_zeroed=masked_avg_pool_fn(_fn, zero_input=True)))


def _register_timm() -> None:
    try:
        from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
    except ImportError:
        return
    register_rule(MaxPool2dSame, _pool_rule(masked_max_pool, "max", adaptive=False))
    register_rule(AvgPool2dSame, _pool_rule(masked_avg_pool, "avg", adaptive=False,
                                            masked_of_zeroed=_avg_pool_of_zeroed))


_register_timm()
