"""Site-wise operations: activations, arithmetic, dtype casts, dropout, per-site Linear and LayerNorm.

None of these needs a mask-aware implementation; their rules only track whether the output stays
exactly zero at masked sites (f(0) == 0) and whether it is non-negative.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ._kinds import ACTIVATIONS, common_layout, passthrough_nonspatial, pointwise_rule
from ._registry import Decision, Info, NodeView, Unsupported, register_rule

__all__: list[str] = []


def _is_number(value, predicate) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and predicate(value)


def _operands(view: NodeView) -> list:
    return [a for a in view.args[:2]] + [v for k, v in view.kwargs.items() if k == "other"]


# --- activations ---------------------------------------------------------------------------------
for _cls, (_zero, _nonneg) in ACTIVATIONS.items():
    register_rule(_cls, pointwise_rule(zero=_zero, nonneg=_nonneg))

_ZERO_FUNCS = [F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.mish, F.elu, F.elu_, F.celu,
               F.selu, F.leaky_relu, F.leaky_relu_, F.hardtanh, F.hardtanh_, F.tanh, F.softsign,
               F.tanhshrink, F.hardshrink, F.softshrink, F.prelu, F.dropout, F.dropout1d, F.dropout2d,
               torch.relu, torch.relu_, torch.tanh, torch.neg, torch.abs, torch.square, torch.sin,
               torch.nn.functional.dropout3d, torch.sign, torch.erf]
_NONNEG = {F.relu, F.relu_, F.relu6, torch.relu, torch.relu_, torch.abs, torch.square}
for _fn in _ZERO_FUNCS:
    register_rule(_fn, pointwise_rule(zero=True, nonneg=_fn in _NONNEG))
for _fn in (F.sigmoid, torch.sigmoid, F.hardsigmoid, F.softplus, torch.exp, torch.cos, F.alpha_dropout):
    register_rule(_fn, pointwise_rule(zero=False, nonneg=_fn is not torch.cos
                                      and _fn is not F.alpha_dropout))

for _name in ("relu", "relu_", "tanh", "tanh_", "neg", "abs", "square", "sign", "float", "double",
              "half", "bfloat16", "to", "type", "type_as", "contiguous", "clone", "detach", "erf",
              "sin", "requires_grad_"):
    register_rule(_name, pointwise_rule(zero=True, nonneg=_name in ("relu", "relu_", "abs", "square")))
for _name in ("sigmoid", "sigmoid_", "exp"):
    register_rule(_name, pointwise_rule(zero=False, nonneg=True))


def _clamp_zero(view: NodeView) -> bool:
    lo = view.arg(1, "min")
    hi = view.arg(2, "max")
    lo_ok = lo is None or _is_number(lo, lambda v: v <= 0)
    hi_ok = hi is None or _is_number(hi, lambda v: v >= 0)
    return lo_ok and hi_ok


def _clamp_nonneg(view: NodeView) -> bool:
    lo = view.arg(1, "min")
    return _is_number(lo, lambda v: v >= 0)


for _t in (torch.clamp, torch.clip, "clamp", "clamp_", "clip", "clip_"):
    register_rule(_t, pointwise_rule(zero=_clamp_zero, nonneg=_clamp_nonneg))
for _t in ("clamp_min", "clamp_min_"):
    register_rule(_t, pointwise_rule(zero=lambda v: _is_number(v.arg(1, "min"), lambda x: x <= 0),
                                     nonneg=lambda v: _is_number(v.arg(1, "min"), lambda x: x >= 0)))
for _t in ("clamp_max", "clamp_max_"):
    register_rule(_t, pointwise_rule(zero=lambda v: _is_number(v.arg(1, "max"), lambda x: x >= 0)))


# --- arithmetic ----------------------------------------------------------------------------------
def _add_rule(view: NodeView) -> Decision:
    spatial = view.spatial_inputs()
    if not spatial:
        return passthrough_nonspatial(view)
    layout, aligned = common_layout(view, spatial)
    zero = True
    nonneg = True
    for a in _operands(view):
        info = view.info(a)
        if info is not None:
            zero = zero and info.spatial is not None and info.zero
            nonneg = nonneg and info.nonneg
        elif isinstance(a, torch.fx.Node):  # a non-tensor value computed at run time
            zero = nonneg = False
        else:
            zero = zero and _is_number(a, lambda v: v == 0)
            nonneg = nonneg and _is_number(a, lambda v: v >= 0)
    if view.node.target in (operator.sub, operator.isub, torch.sub, "sub", "sub_", torch.rsub):
        nonneg = False
    return Decision(out=Info(spatial=layout, zero=zero, nonneg=nonneg, aligned=aligned))


def _mul_rule(view: NodeView) -> Decision:
    spatial = view.spatial_inputs()
    if not spatial:
        return passthrough_nonspatial(view)
    layout, aligned = common_layout(view, spatial)
    zero = any(view.info(n).zero for n in spatial)
    nonneg = True
    for a in _operands(view):
        info = view.info(a)
        if info is not None:
            nonneg = nonneg and info.nonneg
        else:
            nonneg = nonneg and _is_number(a, lambda v: v >= 0)
    return Decision(out=Info(spatial=layout, zero=zero, nonneg=nonneg, aligned=aligned))


def _div_rule(view: NodeView) -> Decision:
    spatial = view.spatial_inputs()
    if not spatial:
        return passthrough_nonspatial(view)
    layout, aligned = common_layout(view, spatial)
    numerator, denominator = view.arg(0, "input"), view.arg(1, "other")
    den = view.info(denominator)
    if den is not None and den.spatial is not None and den.zero:
        raise Unsupported("divides by a feature map that is 0 at masked sites (0/0 there); "
                          "add an epsilon to the denominator")
    num = view.info(numerator)
    zero = num is not None and num.spatial is not None and num.zero
    nonneg = bool(num and num.nonneg) and (den is None and _is_number(denominator, lambda v: v > 0)
                                           or bool(den and den.nonneg))
    return Decision(out=Info(spatial=layout, zero=zero, nonneg=nonneg, aligned=aligned))


for _t in (operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, torch.rsub,
           "add", "add_", "sub", "sub_"):
    register_rule(_t, _add_rule)
for _t in (operator.mul, operator.imul, torch.mul, "mul", "mul_"):
    register_rule(_t, _mul_rule)
for _t in (operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_"):
    register_rule(_t, _div_rule)
register_rule(operator.neg, pointwise_rule(zero=True))
register_rule(torch.pow, pointwise_rule(zero=lambda v: _is_number(v.arg(1, "exponent"), lambda e: e > 0)))
register_rule(operator.pow, pointwise_rule(zero=lambda v: _is_number(v.args[1], lambda e: e > 0)))
register_rule("pow", pointwise_rule(zero=lambda v: _is_number(v.arg(1, "exponent"), lambda e: e > 0)))
register_rule(torch.sqrt, pointwise_rule(zero=True, nonneg=True))
register_rule("sqrt", pointwise_rule(zero=True, nonneg=True))


# --- per-site linear maps and normalisation over channels ----------------------------------------
def _last_dim_rule(bias_of, normalised_dims_of=lambda view: 1, name="operation"):
    def rule(view: NodeView) -> Decision:
        x = view.arg(0, "input")
        info = view.info(x)
        if info is None or info.spatial is None:
            return passthrough_nonspatial(view)
        ndim = len(view.shape(x))
        k = normalised_dims_of(view)
        if max(info.spatial) >= ndim - k:
            raise Unsupported(f"{name} over a spatial dim (mixes sites); only channels-last "
                              "use (spatial dims before the last) is per-site")
        zero = info.zero and bias_of(view) is None
        return Decision(out=Info(spatial=info.spatial, zero=zero, aligned=info.aligned))

    return rule


def _module_bias(view: NodeView):
    return getattr(view.module, "bias", None)


register_rule(nn.Linear, _last_dim_rule(_module_bias, name="Linear"))
register_rule(F.linear, _last_dim_rule(lambda v: v.arg(2, "bias"), name="linear"))
# LayerNorm uses _last_dim_rule too, dispatched with its over-space variant in layer_norm.py.


def _softmax_rule(view: NodeView) -> Decision:
    x = view.arg(0, "input")
    info = view.info(x)
    if info is None or info.spatial is None:
        return passthrough_nonspatial(view)
    dim = view.module.dim if view.module is not None else view.arg(1, "dim")
    ndim = len(view.shape(x))
    if dim is None or dim % ndim in info.spatial:
        raise Unsupported("softmax over a spatial dim (attention over positions)")
    return Decision(out=Info(spatial=info.spatial, zero=False, nonneg=True, aligned=info.aligned))


for _t in (nn.Softmax, F.softmax, torch.softmax, "softmax"):
    register_rule(_t, _softmax_rule)


def _register_third_party() -> None:
    try:
        from timm.layers import DropBlock2d, DropPath
        from timm.layers.norm_act import FrozenBatchNormAct2d
    except ImportError:
        pass
    else:
        register_rule(DropPath, pointwise_rule(zero=True))
        # A random map of dropped blocks times x (rescaled by its kept fraction): x's masked zeros stay
        # zero; its train-mode code branches on sizes, so it is kept whole rather than traced.
        register_rule(DropBlock2d, pointwise_rule(zero=True))
        register_rule(FrozenBatchNormAct2d, pointwise_rule(zero=False))
    try:
        from torchvision.ops import StochasticDepth
        from torchvision.ops.stochastic_depth import stochastic_depth
    except ImportError:
        pass
    else:
        register_rule(StochasticDepth, pointwise_rule(zero=True))
        register_rule(stochastic_depth, pointwise_rule(zero=True))


_register_third_party()
