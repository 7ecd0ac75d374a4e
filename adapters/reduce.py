"""Reductions over space (global pooling in SE / ECA / GRN blocks): over active sites only.

``x.mean((2, 3))`` becomes sum over active sites / number of active sites; ``amax`` ignores masked
sites; ``sum`` and ``norm`` of an input that is zero at masked sites are already correct and run
unchanged. Reductions over channels only are per-site and keep the mask state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._kinds import common_layout, passthrough_nonspatial
from ._registry import POOLED, Decision, Info, NodeView, Unsupported, register_rule
from ._stats import mask_count, masked_moments

__all__ = ["masked_mean", "masked_reduce", "masked_var"]


def _norm_dims(dim, ndim: int) -> tuple[int, ...]:
    if dim is None or dim == []:
        return tuple(range(ndim))
    if isinstance(dim, int):
        return (dim % ndim,)
    return tuple(d % ndim for d in dim)


def masked_mean(mask, input, dim=None, keepdim=False, *, dtype=None):
    """Mean over active sites of the reduced dims (fp32 accumulation or better, no host sync)."""
    if mask is None:
        return input.mean(dim, keepdim=keepdim, dtype=dtype) if dim is not None else input.mean(dtype=dtype)
    return _mean_over_active(input * mask.to(input.dtype), mask, dim, keepdim, dtype)


def _mean_of_zero_input(mask, input, dim=None, keepdim=False, *, dtype=None):
    """:func:`masked_mean` of an input already zero at masked sites: the plain sum is the active sum."""
    if mask is None:
        return masked_mean(None, input, dim, keepdim, dtype=dtype)
    return _mean_over_active(input, mask, dim, keepdim, dtype)


def _mean_over_active(zeroed, mask, dim, keepdim, dtype):
    # A sum over space is no variance: fp32 cascade sums are as exact as the native mean, no fp64 pass.
    dims = _norm_dims(dim, zeroed.dim())
    acc = torch.promote_types(dtype or zeroed.dtype, torch.float32)
    total = zeroed.sum(dims, keepdim=keepdim, dtype=acc)
    count = mask_count(zeroed, mask, dims, acc)
    if not keepdim:
        count = count.squeeze(dims)
    return (total / count.clamp_min(1.0)).to(dtype or zeroed.dtype)


def masked_reduce(fn: Callable, fill: float | None) -> Callable:
    """Masked version of a reduction ``fn(input, *args, **kwargs)``.

    ``fill`` is what masked sites become before reducing: 0 for sum/norm, -inf for max, +inf for
    min (the infinities of all-masked reductions are then replaced by 0).
    """

    def masked(mask, input, *args, **kwargs):
        if mask is None:
            return fn(input, *args, **kwargs)
        if fill == 0.0:
            return fn(input * mask.to(input.dtype), *args, **kwargs)
        out = fn(input.masked_fill(mask == 0, fill), *args, **kwargs)
        return out.masked_fill(out.isinf(), 0.0)

    masked.__name__ = f"masked_{getattr(fn, '__name__', 'reduce')}"
    return masked


def _method(name: str) -> Callable:
    def call(input, *args, **kwargs):
        return getattr(input, name)(*args, **kwargs)

    call.__name__ = name
    return call


def _reduce_rule(masked: Callable, kind: str, dim_index: int = 1, dim_name: str = "dim",
                 keepdim_index: int = 2):
    def rule(view: NodeView) -> Decision:
        x = view.arg(0, "input")
        info = view.info(x)
        if info is None or info.spatial is None:
            return passthrough_nonspatial(view)
        ndim = len(view.shape(x))
        dims = _norm_dims(view.arg(dim_index, dim_name), ndim)
        keepdim = bool(view.arg(keepdim_index, "keepdim", False))
        touched = set(dims) & set(info.spatial)
        if not touched:  # a reduction over channels: per site
            layout = info.spatial if keepdim else tuple(
                d - sum(1 for r in dims if r < d) for d in info.spatial)
            keeps_zero = info.zero and kind in ("mean", "sum", "norm", "max", "min")
            return Decision(out=Info(spatial=layout, zero=keeps_zero,
                                     nonneg=info.nonneg or kind == "norm", aligned=info.aligned))
        if touched != set(info.spatial):
            raise Unsupported("reduces over one spatial dim only (e.g. coordinate attention); "
                              "register an adapter for the block")
        out = POOLED
        if kind in ("sum", "norm") and info.zero:
            return Decision(out=out)  # zeros at masked sites add nothing
        if kind == "mean" and info.zero:  # only the count needs the mask (SE blocks after a masked BN)
            return Decision(out=out, masked=_mean_of_zero_input, mask_of=x)
        return Decision(out=out, masked=masked, mask_of=x)

    return rule


register_rule("mean", _reduce_rule(masked_mean, "mean"))
register_rule(torch.mean, _reduce_rule(masked_mean, "mean"))
for _name, _fn, _kind, _fill in (("sum", torch.sum, "sum", 0.0), ("amax", torch.amax, "max", float("-inf")),
                                 ("amin", torch.amin, "min", float("inf"))):
    register_rule(_name, _reduce_rule(masked_reduce(_method(_name), _fill), _kind))
    register_rule(_fn, _reduce_rule(masked_reduce(_fn, _fill), _kind))
register_rule(torch.linalg.vector_norm, _reduce_rule(masked_reduce(torch.linalg.vector_norm, 0.0), "norm",
                                                     dim_index=2, keepdim_index=3))
register_rule(torch.norm, _reduce_rule(masked_reduce(torch.norm, 0.0), "norm", dim_index=2, keepdim_index=3))
register_rule("norm", _reduce_rule(masked_reduce(_method("norm"), 0.0), "norm", dim_index=2,
                                   keepdim_index=3))


# --- max / min over channels (CBAM's spatial attention), elementwise maximum / minimum --------------
def _values_indices_rule(reduce_kind: str, masked_full: Callable) -> Callable[[NodeView], Decision]:
    """``torch.max`` / ``torch.min`` and their methods, in all three call forms.

    ``max(x)`` reduces everything (over active sites); ``max(x, other)`` is the elementwise maximum;
    ``max(x, dim, keepdim)`` returns (values, indices), per site when ``dim`` is not spatial.
    """
    full = _reduce_rule(masked_full, reduce_kind)

    def rule(view: NodeView) -> Decision:
        x = view.arg(0, "input")
        info = view.info(x)
        second = view.arg(1, "dim") if len(view.args) > 1 or "dim" in view.kwargs else view.kwargs.get("other")
        if isinstance(second, torch.fx.Node) and isinstance(view.info(second), Info):
            return _elementwise_extreme(view)
        if info is None or info.spatial is None:
            return passthrough_nonspatial(view)
        if second is None:
            return full(view)
        ndim = len(view.shape(x))
        dim = second % ndim
        if dim in info.spatial:
            raise Unsupported(f"{reduce_kind} over one spatial dim (a positional reduction); register an "
                              "adapter for the block")
        keepdim = bool(view.arg(2, "keepdim", False))
        layout = info.spatial if keepdim else tuple(d - (1 if d > dim else 0) for d in info.spatial)
        values = Info(spatial=layout, zero=info.zero, nonneg=info.nonneg, aligned=info.aligned)
        indices = Info(spatial=layout, zero=False, nonneg=True, aligned=info.aligned)
        return Decision(out=(values, indices))

    return rule


def _elementwise_extreme(view: NodeView) -> Decision:
    spatial = view.spatial_inputs()
    if not spatial:
        return passthrough_nonspatial(view)
    layout, aligned = common_layout(view, spatial)
    operands = [view.info(n) for n in view.tensor_inputs()]
    zero = all(i.spatial is not None and i.zero for i in operands)
    target = view.node.target
    is_max = target in (torch.max, torch.maximum, torch.fmax, "max", "maximum", "fmax")
    nonneg = any(i.nonneg for i in operands) if is_max else all(i.nonneg for i in operands)
    return Decision(out=Info(spatial=layout, zero=zero, nonneg=nonneg, aligned=aligned))


for _target, _kind, _fill in ((torch.max, "max", float("-inf")), ("max", "max", float("-inf")),
                              (torch.min, "min", float("inf")), ("min", "min", float("inf"))):
    _impl = _target if callable(_target) else _method(_target)
    register_rule(_target, _values_indices_rule(_kind, masked_reduce(_impl, _fill)))
for _target in (torch.maximum, torch.minimum, torch.fmax, torch.fmin, "maximum", "minimum", "fmax", "fmin"):
    register_rule(_target, _elementwise_extreme)


def _channel_only_rule(keeps_zero: bool, nonneg: bool, indices: bool = False,
                       dim_index: int = 1) -> Callable[[NodeView], Decision]:
    """Reductions that are per site over channels and refused over space (no masked version)."""

    def rule(view: NodeView) -> Decision:
        x = view.arg(0, "input")
        info = view.info(x)
        if info is None or info.spatial is None:
            return passthrough_nonspatial(view)
        ndim = len(view.shape(x))
        dims = _norm_dims(view.arg(dim_index, "dim"), ndim)
        if set(dims) & set(info.spatial):
            raise Unsupported(f"{view.describe()} over a spatial dim (no masked version); register an adapter")
        keepdim = bool(view.arg(dim_index + 1, "keepdim", False))
        layout = info.spatial if keepdim else tuple(d - sum(1 for r in dims if r < d) for d in info.spatial)
        return Decision(out=Info(spatial=layout, zero=keeps_zero and info.zero and not indices,
                                 nonneg=nonneg or indices or info.nonneg and keeps_zero, aligned=info.aligned))

    return rule


for _target in (torch.argmax, torch.argmin, "argmax", "argmin"):
    register_rule(_target, _channel_only_rule(False, True, indices=True))
for _target in (torch.prod, "prod"):
    register_rule(_target, _channel_only_rule(True, False))
for _target in (torch.logsumexp, "logsumexp"):
    register_rule(_target, _channel_only_rule(False, False))


# --- variance and standard deviation over space (EvoNorm, hand-written group / instance norms) -----
def _var_args(args: tuple, kwargs: dict) -> tuple[object, float, bool]:
    """(dim, correction, keepdim) of a var/std call after ``input``, in any of torch's signatures."""
    args = list(args)
    dim = kwargs.get("dim")
    unbiased = kwargs.get("unbiased")
    if args and isinstance(args[0], bool):  # var(input, unbiased)
        unbiased = args.pop(0)
    elif args:
        dim = args.pop(0)
        if args and isinstance(args[0], bool):  # var(input, dim, unbiased, keepdim)
            unbiased = args.pop(0)
    keepdim = bool(args[0]) if args else bool(kwargs.get("keepdim", False))
    correction = kwargs.get("correction")
    if correction is None:
        correction = 1 if unbiased is None else int(bool(unbiased))
    return dim, float(correction), keepdim


def masked_var(mask, input, dim=None, correction: float = 1.0, keepdim: bool = False,
               *, with_mean: bool = False, root: bool = False):
    """Variance (``root``: standard deviation) of ``input`` over ``dim`` at active sites.

    The count n is the number of active sites (times the sizes of the other reduced dims); the
    variance is sum (x - mean)^2 / (n - correction), and 0 where n <= correction (an empty or
    one-site region has no spread to estimate; torch would give NaN). ``with_mean`` also returns the
    mean (torch's ``var_mean`` order: (var, mean)). No host synchronisation.
    """
    dims = _norm_dims(dim, input.dim())
    mean, var, n = masked_moments(input, mask.to(input.dtype) if mask.dtype == torch.bool else mask, dims)
    if correction:
        var = torch.where(n > correction, var * n / (n - correction).clamp_min(1.0), torch.zeros_like(var))
    if root:
        var = var.sqrt()
    if not keepdim:
        var, mean = var.squeeze(dims), mean.squeeze(dims)
    var, mean = var.to(input.dtype), mean.to(input.dtype)
    return (var, mean) if with_mean else var


def _var_impl(fn: Callable, with_mean: bool, root: bool) -> Callable:
    def masked(mask, input, *args, **kwargs):
        if mask is None:
            return fn(input, *args, **kwargs)
        dim, correction, keepdim = _var_args(args, kwargs)
        return masked_var(mask, input, dim, correction, keepdim, with_mean=with_mean, root=root)

    masked.__name__ = f"masked_{getattr(fn, '__name__', 'var')}"
    return masked


def _var_rule(masked: Callable, with_mean: bool) -> Callable[[NodeView], Decision]:
    """Per site over channels; over every spatial dim a masked moment; over part of space refused."""

    def rule(view: NodeView) -> Decision:
        x = view.arg(0, "input")
        info = view.info(x)
        if info is None or info.spatial is None:
            return passthrough_nonspatial(view)
        ndim = len(view.shape(x))
        dim, _, keepdim = _var_args(view.args[1:], dict(view.kwargs))
        dims = _norm_dims(dim, ndim)
        touched = set(dims) & set(info.spatial)
        if not touched:  # over channels: one value per site, 0 where every input is 0
            layout = info.spatial if keepdim else tuple(d - sum(1 for r in dims if r < d) for d in info.spatial)
            site = Info(spatial=layout, zero=info.zero, nonneg=True, aligned=info.aligned)
            mean = Info(spatial=layout, zero=info.zero, nonneg=info.nonneg, aligned=info.aligned)
            return Decision(out=(site, mean) if with_mean else site)
        if touched != set(info.spatial):
            raise Unsupported(f"{view.describe()} over part of space only (a positional statistic); register "
                              "an adapter for the block")
        # over the batch too (EvoNorm-B0's batch variance) the result is one statistic for the batch
        out = POOLED if 0 not in dims else Info(spatial=None)
        return Decision(out=(out, out) if with_mean else out, masked=masked, mask_of=x)

    return rule


for _targets, _with_mean, _root in (((torch.var, "var"), False, False), ((torch.std, "std"), False, True),
                                    ((torch.var_mean,), True, False), ((torch.std_mean,), True, True)):
    for _target in _targets:
        _impl = _target if callable(_target) else _method(_target)
        register_rule(_target, _var_rule(_var_impl(_impl, _with_mean, _root), _with_mean))
