"""The rest of torch's elementwise operators, audited against ``torch.overrides`` (``pointwise`` has
the activations and arithmetic that networks use most).

One-tensor operators (``log1p``, ``erfc``, ``F.threshold``, ``nan_to_num``, ...) decide f(0) == 0 by
running the operator, with the node's own constant arguments, on zeros: no hand-kept table to get
wrong. An operator whose f(0) is not finite (``log``, ``reciprocal``, ``rsqrt``) on a map that is zero
at masked sites is refused: masking inf or NaN by multiplication gives NaN. Operators with several
tensor operands (``addcmul``, ``addcdiv``, ``lerp``, ``where``, comparisons, ``hypot``, ...) have a
rule each that combines the operands' mask states.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import pointwise  # noqa: F401  (its rules first: this file fills the gaps and reuses some)
from ._kinds import common_layout, passthrough_nonspatial
from ._registry import Decision, Info, NodeView, Unsupported, register_rule, registered_rule

__all__: list[str] = []

# One-tensor elementwise functions (f(0) found by evaluation) and which are always >= 0.
_UNARY = [
    torch.acos, torch.asin, torch.atan, torch.acosh, torch.asinh, torch.atanh, torch.arccos, torch.arcsin,
    torch.arctan, torch.arcsinh, torch.ceil, torch.floor, torch.round, torch.trunc, torch.frac, torch.fix,
    torch.cosh, torch.sinh, torch.tan, torch.deg2rad, torch.rad2deg, torch.erfc, torch.erfinv,
    torch.exp2, torch.expm1, torch.log, torch.log10, torch.log1p, torch.log2, torch.logit, torch.i0,
    torch.lgamma, torch.digamma, torch.reciprocal, torch.rsqrt, torch.sgn, torch.signbit, torch.sinc,
    torch.nan_to_num, torch.positive, torch.negative, torch.absolute, torch.float_power, torch.special.expit,
    torch.special.erfcx, torch.special.ndtr, torch.special.log_ndtr, torch.sigmoid_,
    F.logsigmoid, F.threshold, F.threshold_, F.rrelu, F.celu_, F.selu_, F.softmin, F.glu, F.silu,
]
_UNARY_METHODS = [
    "acos", "asin", "atan", "acosh", "asinh", "atanh", "ceil", "floor", "round", "trunc", "frac", "fix",
    "cos", "cosh", "sinh", "tan", "deg2rad", "rad2deg", "erfc", "erfinv", "exp2", "expm1", "log", "log10",
    "log1p", "log2", "logit", "i0", "lgamma", "digamma", "reciprocal", "rsqrt", "sgn", "signbit", "sinc",
    "nan_to_num", "positive", "negative", "absolute", "float_power", "sqrt_", "exp_", "abs_", "neg_",
    "square_", "log_", "log1p_", "sin_", "cos_", "floor_", "ceil_", "round_", "trunc_", "tanh_", "erf_",
]
_NONNEG = {torch.exp2, torch.cosh, torch.absolute, torch.i0, torch.special.expit, torch.special.ndtr,
           torch.special.erfcx, torch.sigmoid_, torch.erfc, "exp2", "cosh", "absolute", "i0", "erfc",
           "exp_", "abs_", "square_"}
_RANDOM = {F.rrelu}  # draws random slopes in train mode: never evaluated (no RNG use while wrapping)


def _call(target: Any, args: tuple, kwargs: dict) -> Any:
    if isinstance(target, str):
        return getattr(args[0], target)(*args[1:], **kwargs)
    return target(*args, **kwargs)


def _contains_node(value: Any) -> bool:
    found = []
    fx.map_arg(value, lambda n: found.append(n))
    return bool(found)


def _at_zero(view: NodeView) -> torch.Tensor | None:
    """The op evaluated with zeros for its feature-map operands (when all are exactly 0 at masked
    sites) and its constant arguments as traced: its value at a masked site. None if unknown (an
    operand that is not zero there, a signature this probe cannot imitate, a random op)."""
    zeros = torch.zeros(2, 2, 2, 2, dtype=torch.float64)
    unknown = []

    def substitute(n: fx.Node) -> Any:
        info = view.info(n)
        if isinstance(info, Info) and info.spatial is not None and info.zero:
            return zeros
        unknown.append(n)
        return n

    args = fx.map_arg(view.args, substitute)
    kwargs = dict(fx.map_arg(view.kwargs, substitute))
    if unknown or view.node.target in _RANDOM:
        return None
    try:
        out = _call(view.node.target, tuple(args), kwargs)
    except Exception:  # noqa: BLE001  (decide conservatively: not known to be 0)
        return None
    return out if isinstance(out, torch.Tensor) else None


def _evaluated_rule(view: NodeView) -> Decision:
    """Any elementwise op: zero at masked sites iff evaluating it on the zeros there gives 0."""
    spatial = view.spatial_inputs()
    if not spatial:
        return passthrough_nonspatial(view)
    layout, aligned = common_layout(view, spatial)
    target = view.node.target
    if target in (F.glu, F.softmin, "softmin"):
        x = view.arg(0, "input")
        dim = view.arg(1, "dim")
        if dim is None or dim % len(view.shape(x)) in view.info(x).spatial:
            raise Unsupported("acts across a spatial dim (only per-site use over channels is supported)")
    at_zero = _at_zero(view)
    if at_zero is not None and not bool(torch.isfinite(at_zero.double()).all()):
        raise Unsupported("is not finite at 0, and its input is 0 at masked sites (masking inf or NaN "
                          "gives NaN); add an epsilon before it")
    zero = at_zero is not None and bool((at_zero == 0).all())
    return Decision(out=Info(spatial=layout, zero=zero, nonneg=target in _NONNEG, aligned=aligned))


def _is_zero_operand(view: NodeView, value: Any) -> bool:
    """``value`` is exactly 0 at masked sites: a zero feature map, or the number 0."""
    if isinstance(value, fx.Node):
        info = view.info(value)
        return isinstance(info, Info) and info.spatial is not None and info.zero
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _operand_rule(zero_of: Callable[[NodeView], bool], nonneg_of: Callable[[NodeView], bool] = lambda v: False,
                  check: Callable[[NodeView], None] = lambda v: None) -> Callable[[NodeView], Decision]:
    def rule(view: NodeView) -> Decision:
        spatial = view.spatial_inputs()
        if not spatial:
            return passthrough_nonspatial(view)
        layout, aligned = common_layout(view, spatial)
        check(view)
        return Decision(out=Info(spatial=layout, zero=zero_of(view), nonneg=nonneg_of(view), aligned=aligned))

    return rule


def _z(view: NodeView, index: int, name: str) -> bool:
    return _is_zero_operand(view, view.arg(index, name))


def _nonneg(view: NodeView, value: Any) -> bool:
    info = view.info(value) if isinstance(value, fx.Node) else None
    if info is not None:
        return info.nonneg
    return isinstance(value, (int, float)) and value >= 0


def _no_zero_denominator(index: int, name: str) -> Callable[[NodeView], None]:
    def check(view: NodeView) -> None:
        if _z(view, index, name) and isinstance(view.arg(index, name), fx.Node):
            raise Unsupported("divides by a feature map that is 0 at masked sites (0/0 there); add an "
                              "epsilon to the denominator")

    return check


_COMPARE_AT_ZERO = {"gt": False, "lt": False, "ne": False, "ge": True, "le": True, "eq": True}


def _compare_rule(kind: str) -> Callable[[NodeView], Decision]:
    def zero_of(view: NodeView) -> bool:
        a, b = view.arg(0, "input"), view.arg(1, "other")
        if not (_is_zero_operand(view, a) or not isinstance(a, fx.Node)):
            return False
        if not (_is_zero_operand(view, b) or not isinstance(b, fx.Node)):
            return False
        left = 0.0 if isinstance(a, fx.Node) else a
        right = 0.0 if isinstance(b, fx.Node) else b
        return not getattr(operator, kind)(left, right)

    return _operand_rule(zero_of, lambda v: True)


def _torch_pointwise_names() -> list[str]:
    """Public torch functions whose ATen op carries the ``pointwise`` tag: torch's own list."""
    names = []
    for name in dir(torch.ops.aten):
        if name.startswith("_") or not (hasattr(torch, name) or hasattr(torch.Tensor, name)):
            continue
        try:
            packet = getattr(torch.ops.aten, name)
            overload = getattr(packet, packet.overloads()[0])
        except (AttributeError, IndexError, RuntimeError):
            continue
        if torch.Tag.pointwise in overload.tags:
            names.append(name)
    return names


def _register() -> None:
    for target in _UNARY + _UNARY_METHODS:
        if registered_rule(target) is None:
            register_rule(target, _evaluated_rule)
    # input + value * t1 * t2 (ConvNeXt-V2's GRN): zero when input and one factor are
    register_rule(torch.addcmul, _operand_rule(lambda v: _z(v, 0, "input") and (_z(v, 1, "tensor1") or
                                                                                _z(v, 2, "tensor2"))))
    register_rule("addcmul", registered_rule(torch.addcmul))
    register_rule("addcmul_", registered_rule(torch.addcmul))
    register_rule(torch.addcdiv, _operand_rule(lambda v: _z(v, 0, "input") and _z(v, 1, "tensor1"),
                                               check=_no_zero_denominator(2, "tensor2")))
    register_rule("addcdiv", registered_rule(torch.addcdiv))
    register_rule("addcdiv_", registered_rule(torch.addcdiv))
    # start + weight * (end - start)
    for target in (torch.lerp, "lerp", "lerp_"):
        register_rule(target, _operand_rule(lambda v: _z(v, 0, "input") and _z(v, 1, "end")))
    for target in (torch.where, "where"):
        register_rule(target, _operand_rule(lambda v: _z(v, 1, "input") and _z(v, 2, "other")))
    for target in (torch.hypot, "hypot"):
        register_rule(target, _operand_rule(lambda v: _z(v, 0, "input") and _z(v, 1, "other"), lambda v: True))
    for target in (torch.atan2, torch.arctan2, "atan2", "arctan2"):
        register_rule(target, _operand_rule(lambda v: _z(v, 0, "input") and _z(v, 1, "other")))
    for target in (torch.fmod, torch.remainder, "fmod", "remainder", operator.mod):
        register_rule(target, _operand_rule(lambda v: _z(v, 0, "input"), check=_no_zero_denominator(1, "other")))
    for target in (torch.copysign, torch.xlogy, torch.special.xlogy, "copysign", "xlogy"):
        register_rule(target, _operand_rule(lambda v: _z(v, 0, "input")))
    for target in (torch.multiply, "multiply"):
        register_rule(target, registered_rule(torch.mul))
    for target in (torch.subtract, "subtract"):
        register_rule(target, registered_rule(torch.sub))
    for target in (torch.divide, "divide", "true_divide"):
        register_rule(target, registered_rule(torch.div))
    for target in (torch.logaddexp, torch.logaddexp2, "logaddexp", "logaddexp2"):
        register_rule(target, _operand_rule(lambda v: False))
    for target in (torch.logical_and, "logical_and", operator.and_):
        register_rule(target, _operand_rule(lambda v: _z(v, 0, "input") or _z(v, 1, "other"), lambda v: True))
    for target in (torch.logical_or, torch.logical_xor, "logical_or", "logical_xor", operator.or_):
        register_rule(target, _operand_rule(lambda v: _z(v, 0, "input") and _z(v, 1, "other"), lambda v: True))
    for target in (torch.logical_not, "logical_not", torch.isnan, torch.isinf, torch.isfinite, "isnan",
                   "isinf", "isfinite"):
        register_rule(target, _evaluated_rule)
    for kind in _COMPARE_AT_ZERO:
        for target in (getattr(torch, kind), kind, getattr(operator, kind)):
            register_rule(target, _compare_rule(kind))
    for target in (torch.masked_fill, "masked_fill", "masked_fill_"):
        register_rule(target, _operand_rule(lambda v: _z(v, 0, "input") and _is_zero_operand(v, v.arg(2, "value"))))
    # everything else torch tags pointwise (in-place variants, bitwise ops, igamma, polygamma, ...)
    for name in _torch_pointwise_names():
        for target in (getattr(torch, name, None), name if hasattr(torch.Tensor, name) else None):
            if target is not None and registered_rule(target) is None:
                register_rule(target, _evaluated_rule)


_register()
