"""Positions flattened into one axis, and what may be done with them (private infrastructure).

A reshape that merges every spatial axis of a map into one axis (``x.reshape(b, c, h * w)``,
``x.flatten(2)``), optionally together with a trailing part of the channels (EvoNorm's
``x.reshape(b, groups, -1)``), gives a *flat* tensor: its sites are still the map's sites, in row-major
order, so the patch mask can follow them. Taken alone such a reshape is refused (attention over
positions starts this way); it is accepted provisionally, and every use of the flat tensor must be
one of:

- per-site work that keeps the flat axis whole: arithmetic, activations, casts, layout operations
  that leave the flat axis alone (the registered rules decide, seeing the flat axis as the only
  spatial dim);
- a reduction over the flat axis (sum, mean, var, std...): a masked reduction over active sites;
- a softmax over the flat axis: a softmax over *active* sites (masked logits are left out, not
  zeroed), so its result is a set of pooling weights that is exactly 0 at masked sites;
- a matrix product or einsum that contracts the flat axes of two flat tensors of the same positions:
  a pooling over active sites (global-context attention pooling);
- a reshape that splits the flat axis back into the map's sites (per-site work done in the flat
  layout, e.g. a hand-written GroupNorm), except for softmax weights, which stay pooling weights.

Anything else (a product over positions x positions, i.e. token-to-token attention; softmax weights
turned back into a map; log_softmax over the positions) is refused, and the refusal is reported at
the reshape that flattened the positions, with the later use named.
"""

from __future__ import annotations

import operator
import re
from collections import ChainMap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ._kinds import ACTIVATIONS
from ._registry import POOLED, Decision, Info, NodeView, Unsupported

__all__ = ["FlatInfo", "flat_inputs", "flat_rule", "flatten_or", "blame", "flat_mask_like",
           "masked_softmax"]


@dataclass(frozen=True)
class FlatInfo(Info):
    """Info of a tensor whose sites are merged into one axis (``spatial`` is None).

    dim: position of the flat axis. lead: how many trailing channel values are merged in front of
    the sites (1 for a plain ``h * w`` flattening). axes: the grid axes in the order they are
    flattened. source: the spatial map that was flattened (its sizes give the mask at run time),
    src_spatial: that map's spatial dims, grid: its spatial sizes at the traced size. origin: the
    reshape node that flattened it and reason: why that reshape alone is refused. weights: computed
    from a softmax over the positions, so usable as pooling weights only (never unflattened into a map).
    """

    dim: int = -1
    lead: int = 1
    axes: tuple[int, ...] = ()
    source: Any = None
    src_spatial: tuple[int, ...] = ()
    grid: tuple[int, ...] = ()
    origin: Any = None
    reason: str = ""
    weights: bool = False  # a softmax over the positions (or computed from one): pooling weights only

    def geometry(self) -> tuple:
        return (self.lead, self.axes, self.grid)


# --- run time ------------------------------------------------------------------------------------
def flat_mask_like(mask: torch.Tensor | None, source: torch.Tensor, src_spatial: tuple[int, ...],
                   ref: torch.Tensor, dim: int, lead: int) -> torch.Tensor | None:
    """The patch mask in the layout of a flat tensor ``ref``: 1 everywhere but the batch dim and the
    flat axis ``dim``, whose entries are the sites of ``source`` in row-major order (the order the
    reshape flattened them in), each block repeated for the ``lead`` channel values merged in front."""
    if mask is None:
        return None
    from sparsify.rewrite import mask_like

    m = mask_like(mask, source, src_spatial)  # 1 but at the batch and spatial dims: rows are the sites
    b = m.shape[0]
    flat = m.reshape(b, 1, -1).expand(b, lead, -1).reshape(b, -1)
    shape = [1] * ref.dim()
    shape[0], shape[dim] = b, flat.shape[1]
    return flat.reshape(shape)


def masked_softmax(input: torch.Tensor, mask: torch.Tensor, dim: int,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Softmax over active sites only: masked logits are left out (weight exactly 0), not zeroed.

    A region without active sites gives all zeros (no NaN). Max-subtracted, no host sync."""
    if dtype is not None:
        input = input.to(dtype)
    keep = mask > 0
    z = input.masked_fill(~keep, torch.finfo(input.dtype).min)
    top = z.amax(dim, keepdim=True).detach()  # the softmax is shift-invariant
    e = torch.exp(z - top) * keep.to(input.dtype)
    total = e.sum(dim, keepdim=True)  # >= 1 where any site is active (its maximum gives exp(0))
    return e / torch.where(total > 0, total, torch.ones_like(total))


def _softmax_impl(orig: Callable, dtype_index: int) -> Callable:
    def masked(mask, input, *args, **kwargs):
        if mask is None:
            return orig(input, *args, **kwargs)
        dim = args[0] if args else kwargs["dim"]
        dtype = args[dtype_index - 1] if len(args) >= dtype_index else kwargs.get("dtype")
        return masked_softmax(input, mask, dim, dtype)

    masked.__name__ = "masked_softmax_over_sites"
    return masked


def _masked_softmax_module(module: nn.Softmax, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return module(x) if mask is None else masked_softmax(x, mask, module.dim)


def _product_impl(fn: Callable, operand: int) -> Callable:
    """``fn`` with its ``operand``-th argument zeroed at masked sites first (a pooling over sites)."""

    def masked(mask, *args, **kwargs):
        if mask is not None:
            args = list(args)
            if isinstance(args[0], str) and len(args) == 2 and isinstance(args[1], (list, tuple)):
                ops = list(args[1])  # einsum(eq, [a, b])
                ops[operand - 1] = ops[operand - 1] * mask.to(ops[operand - 1].dtype)
                args[1] = ops
            else:
                args[operand] = args[operand] * mask.to(args[operand].dtype)
        return fn(*args, **kwargs)

    masked.__name__ = "masked_pooling_product"
    return masked


_F_SOFTMAX = _softmax_impl(F.softmax, 3)
_T_SOFTMAX = _softmax_impl(torch.softmax, 2)
_M_SOFTMAX = _softmax_impl(lambda t, *a, **k: t.softmax(*a, **k), 2)
_SOFTMAX = {F.softmax: _F_SOFTMAX, torch.softmax: _T_SOFTMAX, "softmax": _M_SOFTMAX}
_LOG_SOFTMAX = {F.log_softmax, torch.log_softmax, "log_softmax", nn.LogSoftmax}
_MATMUL = {torch.matmul: torch.matmul, operator.matmul: operator.matmul, torch.bmm: torch.bmm,
           "matmul": torch.matmul, "bmm": torch.bmm}

# Uses handed to the registered rules with the flat axis as the only spatial dim: per-site work,
# layout operations and reductions (whose rules refuse what they cannot follow).
_DELEGATED_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.neg, operator.getitem, torch.add, torch.sub, torch.mul, torch.div,
    torch.exp, torch.sigmoid, torch.relu, torch.tanh, torch.abs, torch.square, torch.sqrt, torch.clamp,
    F.relu, F.gelu, F.silu, F.sigmoid, F.dropout,
    torch.flatten, torch.reshape, torch.unflatten, torch.permute, torch.transpose, torch.unsqueeze, torch.squeeze,
    torch.sum, torch.mean, torch.amax, torch.amin, torch.var, torch.std, torch.var_mean, torch.std_mean,
}
_DELEGATED_METHODS = {
    "add", "sub", "mul", "div", "neg", "exp", "sigmoid", "relu", "tanh", "abs", "square", "sqrt",
    "clamp", "clamp_min", "clamp_max", "float", "double", "half", "bfloat16", "to", "type", "type_as",
    "contiguous", "clone", "detach", "view", "reshape", "flatten", "permute", "transpose", "unsqueeze",
    "squeeze", "expand", "expand_as", "sum", "mean", "amax", "amin", "var", "std", "view_as", "reshape_as",
    "unflatten",
}


# --- analysis ------------------------------------------------------------------------------------
def flat_inputs(view: NodeView) -> list[fx.Node]:
    """This node's tensor inputs whose positions are flattened into one axis."""
    return [n for n in view.tensor_inputs() if isinstance(view.info(n), FlatInfo)]


def blame(view: NodeView, reason: str) -> tuple[fx.Node, str]:
    """Where to report a refusal: a refused use of flat positions is reported at the reshape that
    flattened them (the root cause), with the use named."""
    flats = flat_inputs(view)
    if not flats:
        return view.node, reason
    info = view.info(flats[0])
    return info.origin, (f"{info.reason}; the flattened positions are then used by node '{view.node.name}' "
                         f"({view.describe()}), which is not a pooling over them: {reason}")


_RESHAPES = {"view", "reshape", "flatten", torch.reshape, torch.flatten, nn.Flatten}


def flatten_or(view: NodeView, rule: Callable[[NodeView], Decision]) -> Decision:
    """``rule(view)``; if it refuses a reshape that merges every spatial dim into one axis, a flat
    tensor instead (accepted provisionally: see the module docstring)."""
    try:
        return rule(view)
    except Unsupported as error:
        target = type(view.module) if view.module is not None else view.node.target
        if target not in _RESHAPES:
            raise
        flat = _flatten(view, str(error))
        if flat is None:
            raise
        return Decision(out=flat)


def _product(sizes) -> int:
    total = 1
    for s in sizes:  # a plain loop (no math.prod over a generator)
        total *= s
    return total


def _flatten(view: NodeView, reason: str) -> FlatInfo | None:
    """The flat tensor a reshape makes when its output has one axis of size ``lead * sites`` right
    after the (batch, channel) values before the map's sites and right before whatever follows them:
    row-major order then puts site s of the ``lead`` trailing channel values at ``c * sites + s``."""
    x = view.args[0] if view.args else view.kwargs.get("input")
    info = view.info(x)
    in_shape, out_shape = view.shape(x), view.shape()
    if info is None or info.spatial is None or not isinstance(out_shape, torch.Size) or not info.aligned:
        return None
    spatial = sorted(info.spatial)
    first, last = spatial[0], spatial[-1]
    if first < 1 or spatial != list(range(first, last + 1)) or any(in_shape[d] == 1 for d in spatial):
        return None  # the sites must be contiguous, after the batch dim, and unambiguous in size
    sites, before, after = _product(in_shape[d] for d in spatial), _product(in_shape[:first]), \
        _product(in_shape[last + 1:])
    for k in range(len(out_shape) - 1, 0, -1):
        if _product(out_shape[k + 1:]) != after:
            continue
        if out_shape[k] % sites == 0 and _product(out_shape[:k]) * (out_shape[k] // sites) == before:
            lead = out_shape[k] // sites
            order = sorted(range(len(info.spatial)), key=lambda a: info.spatial[a])
            return FlatInfo(spatial=None, zero=info.zero, nonneg=info.nonneg, dim=k, lead=lead,
                            axes=tuple(order), source=x, src_spatial=info.spatial,
                            grid=tuple(in_shape[d] for d in info.spatial), origin=view.node, reason=reason)
    return None


def _fake_infos(view: NodeView, flats: list[fx.Node]) -> ChainMap:
    geometry = {view.info(n).geometry() for n in flats}
    if len(geometry) != 1:
        raise Unsupported("combines positions flattened from maps of different sizes")
    fake = {n: Info(spatial=(view.info(n).dim,), zero=view.info(n).zero, nonneg=view.info(n).nonneg)
            for n in flats}
    return ChainMap(fake, view._infos)


def _unfake(out: Any, like: FlatInfo) -> Any:
    if isinstance(out, tuple):
        return tuple(_unfake(o, like) for o in out)
    if not isinstance(out, Info) or out.spatial is None:
        return out
    if len(out.spatial) != 1:
        raise Unsupported("turns flattened positions into more than one spatial axis")
    return like.but(dim=out.spatial[0], zero=out.zero, nonneg=out.nonneg)


def flat_rule(view: NodeView, rule: Callable[[NodeView], Decision] | None) -> Decision:
    """Decision for a node with flat inputs (see the module docstring), or Unsupported."""
    flats = flat_inputs(view)
    like = view.info(flats[0])
    target = type(view.module) if view.module is not None else view.node.target
    if target in _LOG_SOFTMAX:
        raise Unsupported("log_softmax over flattened positions: its value at a masked site would be "
                          "log 0 = -inf, so the sites cannot be left out; only softmax pooling weights "
                          "are supported")
    if target in _SOFTMAX or target is nn.Softmax:
        return _softmax(view, flats, target)
    if target in _MATMUL:
        return _matmul(view, target)
    if target is torch.einsum:
        return _einsum(view)
    delegated = (target in _DELEGATED_FUNCTIONS or target in _DELEGATED_METHODS
                 or (isinstance(target, type) and target in ACTIVATIONS))
    if not delegated or rule is None:
        raise Unsupported(f"{view.describe()} of flattened positions is not a pooling over them")
    fake_view = NodeView(view.node, view.module, _fake_infos(view, flats), view._shapes)
    try:
        decision = rule(fake_view)
    except Unsupported:
        restored = _unflatten(view, flats) if target in _RESHAPES_BACK else None
        if restored is None:
            raise
        return Decision(out=restored)
    if decision.require_zero:
        raise Unsupported("needs the flattened positions zero at masked sites")
    decision.out = _unfake(decision.out, like.but(weights=any(view.info(n).weights for n in flats)))
    return decision


_RESHAPES_BACK = {"view", "reshape", "view_as", "reshape_as", "unflatten", torch.reshape, torch.unflatten,
                  nn.Unflatten}


def _unflatten(view: NodeView, flats: list[fx.Node]) -> Info | None:
    """The map a reshape restores when it splits the flat axis back into the source's spatial sizes,
    in the order they were flattened, right after the (batch, channel) values before them: per-site
    work done in the flat layout (a hand-written GroupNorm: ``x.view(n, g, -1)``, normalise,
    ``x.view(n, c, h, w)``). Softmax weights stay pooling weights and are not restored."""
    x = view.args[0] if view.args else view.kwargs.get("input")
    info = view.info(x)
    if not isinstance(info, FlatInfo) or info.weights or len(flats) != 1:
        return None
    in_shape, out_shape = view.shape(x), view.shape()
    if not isinstance(out_shape, torch.Size):
        return None
    before, after = _product(in_shape[:info.dim]), _product(in_shape[info.dim + 1:])
    sizes = tuple(info.grid[a] for a in info.axes)  # the sites' sizes in memory order
    n = len(sizes)
    for j in range(1, len(out_shape) - n + 1):
        if (tuple(out_shape[j:j + n]) == sizes and _product(out_shape[j + n:]) == after
                and _product(out_shape[:j]) == before * info.lead and out_shape[0] == in_shape[0]):
            spatial = tuple(j + info.axes.index(a) for a in range(n))
            return Info(spatial=spatial, zero=info.zero, nonneg=info.nonneg, aligned=True)
    return None


def _softmax(view: NodeView, flats: list[fx.Node], target: Any) -> Decision:
    x = view.arg(0, "input")
    info = view.info(x)
    if not isinstance(info, FlatInfo):
        raise Unsupported("softmax of a tensor combined with flattened positions")
    dim = view.module.dim if view.module is not None else view.arg(1, "dim")
    if dim is None:
        raise Unsupported("softmax without an explicit dim over flattened positions")
    ndim = len(view.shape(x))
    if dim % ndim != info.dim:  # over channels at each site: the registered rule decides
        fake_view = NodeView(view.node, view.module, _fake_infos(view, flats), view._shapes)
        from ._registry import find_rule

        decision = find_rule(view.node, view.module)(fake_view)
        decision.out = _unfake(decision.out, info)
        return decision
    masked = _masked_softmax_module if view.module is not None else _SOFTMAX[target]
    return Decision(out=info.but(zero=True, nonneg=True, weights=True), masked=masked, mask_of=x)


def _pool(view: NodeView, operands: list[Any], masked_fn: Callable, operand_index: int) -> Decision:
    infos = [view.info(a) for a in operands]
    if len({i.geometry() for i in infos}) != 1:
        raise Unsupported("contracts positions flattened from maps of different sizes")
    if any(i.zero for i in infos):  # weights exactly 0 at masked sites: the sum is over active sites
        return Decision(out=POOLED)
    return Decision(out=POOLED, masked=_product_impl(masked_fn, operand_index), mask_of=operands[0])


def _matmul(view: NodeView, target: Any) -> Decision:
    a, b = view.arg(0, "input"), view.arg(1, "other" if target is not torch.bmm else "mat2")
    ia, ib = view.info(a), view.info(b)
    if not (isinstance(ia, FlatInfo) and isinstance(ib, FlatInfo)):
        raise Unsupported("multiplies flattened positions with a tensor that is not a map of the same "
                          "positions (a value pooled from them and applied back at every position, as in "
                          "attention or lambda layers, or a fixed positional weight): only a product that "
                          "contracts the positions of two maps is a pooling")
    na, nb = len(view.shape(a)), len(view.shape(b))
    if nb < 2 or ia.dim != na - 1 or ib.dim != nb - 2:
        raise Unsupported("a product of two tensors of flattened positions that does not contract over them "
                          "gives a map over positions x positions: attention over positions, which mixes "
                          "every position with every other")
    return _pool(view, [a, b], _MATMUL[target], 0)


def _einsum(view: NodeView) -> Decision:
    equation = view.args[0]
    operands = list(view.args[1]) if len(view.args) == 2 and isinstance(view.args[1], (list, tuple)) \
        else list(view.args[1:])
    if not isinstance(equation, str) or "..." in equation or "->" not in equation or len(operands) != 2:
        raise Unsupported("einsum over flattened positions with an implicit output or an ellipsis")
    inputs, output = equation.replace(" ", "").split("->")
    terms = inputs.split(",")
    letters = set()
    for term, op in zip(terms, operands):
        info = view.info(op)
        if not isinstance(info, FlatInfo) or not re.fullmatch(r"[a-zA-Z]+", term):
            raise Unsupported("einsum of flattened positions with a tensor not computed from the same positions")
        letters.add(term[info.dim])
    if len(letters) != 1 or letters & set(output):
        raise Unsupported("einsum that keeps flattened positions in its output or pairs two different ones: "
                          "attention over positions, which mixes every position with every other")
    return _pool(view, operands, torch.einsum, 1)
