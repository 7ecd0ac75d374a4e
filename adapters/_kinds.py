"""Rule factories for the kinds of operation in design.md section 4.

- pointwise: acts on each site independently; the output is zero at masked sites when the op maps
  0 to 0 and its spatial inputs are zero there.
- mixing: reads neighbouring sites (convolution, interpolation); its input must be zero at masked
  sites, its output is not.
- statistic: computes statistics over space; replaced by a masked implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._registry import Decision, Info, NodeView, Unsupported

__all__ = [
    "pointwise_rule",
    "mixing_rule",
    "statistic_rule",
    "zero_output",
    "passthrough_nonspatial",
    "module_preserves_zero",
    "module_is_nonneg",
    "common_layout",
    "check_no_fixed_maps",
    "nonspatial_like",
]

# Activation modules by what they do at 0: (maps 0 to 0, output always >= 0).
ACTIVATIONS: dict[type, tuple[bool, bool]] = {
    nn.ReLU: (True, True), nn.ReLU6: (True, True), nn.GELU: (True, False), nn.SiLU: (True, False),
    nn.Hardswish: (True, False), nn.Mish: (True, False), nn.ELU: (True, False),
    nn.CELU: (True, False), nn.SELU: (True, False), nn.LeakyReLU: (True, False),
    nn.PReLU: (True, False), nn.Tanh: (True, False), nn.Hardtanh: (True, False),
    nn.Softsign: (True, False), nn.Tanhshrink: (True, False), nn.Hardshrink: (True, False),
    nn.Softshrink: (True, False), nn.Identity: (True, False),
    nn.Sigmoid: (False, True), nn.Hardsigmoid: (False, True), nn.Softplus: (False, True),
    nn.Dropout: (True, False), nn.Dropout1d: (True, False), nn.Dropout2d: (True, False),
    nn.Dropout3d: (True, False), nn.AlphaDropout: (False, False),
}


def _lookup(module: nn.Module | None) -> tuple[bool, bool] | None:
    if module is None:
        return (True, False)
    for cls in type(module).__mro__:
        if cls in ACTIVATIONS:
            return ACTIVATIONS[cls]
    return None


def module_preserves_zero(module: nn.Module | None) -> bool:
    found = _lookup(module)
    return bool(found and found[0])


def module_is_nonneg(module: nn.Module | None) -> bool:
    found = _lookup(module)
    return bool(found and found[1]) if module is not None else False


def check_no_fixed_maps(view: NodeView, layout: tuple[int, ...]) -> None:
    """Refuse a tensor without per-site values that varies along the output's spatial dims.

    Such a tensor (a coordinate map, a positional bias buffer, a constant image) is not computed
    from the active sites: combined with a feature map it gives masked sites and a larger canvas
    their own values, so canvas invariance cannot hold. Pooled vectors (size 1 there), broadcasts of
    them and fresh or random tensors pass.
    """
    out_shape = view.shape()
    if not isinstance(out_shape, torch.Size):
        return
    for n in view.tensor_inputs():
        info = view.info(n)
        if info is None or info.spatial is not None:
            continue
        varies = info.varies if info.varies is not None else view.shape(n)
        if not isinstance(varies, (tuple, torch.Size)):
            continue
        shift = len(out_shape) - len(varies)
        extent = [varies[d - shift] for d in layout if 0 <= d - shift < len(varies)]
        if any(e > 1 for e in extent):
            raise Unsupported(
                f"combines a feature map with '{n.name}', a fixed map of shape {tuple(view.shape(n))} "
                "that varies over space (a coordinate channel or positional bias): it is not computed "
                "from the visible sites, so masked patches and a larger canvas would change what they "
                "see. Compute it from the features, or stop the stages before it (stages=[...])")


def nonspatial_like(view: NodeView, **changes: Any) -> Info:
    """Info of a tensor without per-site values computed from this node's tensor inputs."""
    inputs = view.tensor_inputs()
    per_sample = any(getattr(view.info(n), "per_sample", False) for n in inputs)
    varies = None
    known = [view.info(n).varies for n in inputs]
    if inputs and all(v is not None for v in known) and any(view.shape(n) == view.shape() for n in inputs):
        # a same-shape op on broadcasts (expanded pooled vectors, fresh tensors): values still vary
        # only where the inputs' did
        rank = max(len(v) for v in known)
        padded = [(1,) * (rank - len(v)) + tuple(v) for v in known]
        varies = tuple(max(d) for d in zip(*padded)) if rank else ()
    info = Info(spatial=None, per_sample=per_sample, varies=varies)
    return info.but(**changes) if changes else info


def common_layout(view: NodeView, nodes: list) -> tuple[tuple[int, ...], bool]:
    """The spatial dims shared by ``nodes`` (after broadcasting) and whether all are aligned.

    Also refuses fixed maps with spatial extent among the node's other tensor inputs."""
    out_shape = view.shape()
    layouts = set()
    aligned = True
    for n in nodes:
        info = view.info(n)
        shape = view.shape(n)
        # Broadcasting aligns trailing dims: shift positions by the rank difference.
        shift = (len(out_shape) - len(shape)) if isinstance(out_shape, tuple) and shape else 0
        layouts.add(tuple(d + shift for d in info.spatial))
        aligned = aligned and info.aligned
    if len(layouts) != 1:
        raise Unsupported(f"combines feature maps with different layouts {sorted(layouts)}")
    layout = layouts.pop()
    check_no_fixed_maps(view, layout)
    return layout, aligned


def passthrough_nonspatial(view: NodeView) -> Decision:
    shape = view.shape()
    if shape is None:
        return Decision(out=None)
    info = nonspatial_like(view)
    if isinstance(shape, list):  # a tuple of tensors
        return Decision(out=tuple(info for _ in shape))
    return Decision(out=info)


def pointwise_rule(zero: bool | Callable[[NodeView], bool] = True,
                   nonneg: bool | Callable[[NodeView], bool] = False) -> Callable[[NodeView], Decision]:
    """Rule for ops applied at each site independently.

    ``zero``: whether f(0) == 0 (a callable may decide per node, e.g. from a module's activation).
    The output is zero at masked sites iff f(0) == 0, every spatial input is zero there, and no
    non-spatial tensor input could add a non-zero value (callables see the whole node and decide).
    """

    def rule(view: NodeView) -> Decision:
        spatial = view.spatial_inputs()
        if not spatial:
            return passthrough_nonspatial(view)
        layout, aligned = common_layout(view, spatial)
        maps_zero = zero(view) if callable(zero) else zero
        out_zero = maps_zero and all(view.info(n).zero for n in spatial)
        is_nonneg = nonneg(view) if callable(nonneg) else nonneg
        return Decision(out=Info(spatial=layout, zero=out_zero, nonneg=is_nonneg, aligned=aligned))

    return rule


def mixing_rule(input_index: int = 0, input_name: str = "input", zero_out: bool = False,
                masked: Callable[..., Any] | None = None,
                nonneg: Callable[[NodeView], bool] | None = None) -> Callable[[NodeView], Decision]:
    """Rule for ops that mix neighbouring sites: their input must be zero at masked sites."""

    def rule(view: NodeView) -> Decision:
        x = view.arg(input_index, input_name)
        info = view.info(x)
        others = [n for n in view.spatial_inputs() if n is not x]
        if others:
            raise Unsupported("mixes a feature map into another operand (e.g. a spatial kernel)")
        if info is None or info.spatial is None:
            return passthrough_nonspatial(view)
        out = Info(spatial=info.spatial, zero=zero_out, nonneg=bool(nonneg and nonneg(view)),
                   aligned=True)
        return Decision(out=out, require_zero=[x], masked=masked, mask_of=x if masked else None)

    return rule


def statistic_rule(masked: Callable[..., Any], input_index: int = 0, input_name: str = "input",
                   global_output: bool = False,
                   nonneg: Callable[[NodeView], bool] | None = None) -> Callable[[NodeView], Decision]:
    """Rule for ops computing statistics over space: replaced by ``masked``.

    The replacement reads only active sites; its output is not zero at masked sites (it is a
    per-site map of the same layout) unless ``global_output`` (no spatial dims left).
    """

    def rule(view: NodeView) -> Decision:
        x = view.arg(input_index, input_name)
        info = view.info(x)
        if info is None or info.spatial is None:
            return passthrough_nonspatial(view)
        if any(n is not x for n in view.spatial_inputs()):
            raise Unsupported("takes a second feature map as a statistic input")
        if global_output:
            out = Info(spatial=None, per_sample=True)
        else:
            out = Info(spatial=info.spatial, zero=False, nonneg=bool(nonneg and nonneg(view)),
                       aligned=info.aligned)
        return Decision(out=out, masked=masked, mask_of=x)

    return rule


def zero_output(rule: Callable[[NodeView], Decision]) -> Callable[[NodeView], Decision]:
    """``rule`` with its output declared exactly zero at masked sites: for replacements that zero it
    themselves (a normalisation that multiplies by the mask where it writes its output), so that no
    mask multiply, and no second saved copy of the map, is needed before the next convolution."""

    def zero_rule(view: NodeView) -> Decision:
        decision = rule(view)
        if isinstance(decision.out, Info) and decision.out.spatial is not None:
            decision.out = decision.out.but(zero=True)
        return decision

    return zero_rule
