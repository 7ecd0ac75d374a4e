"""Interpolation / upsampling: mixes neighbouring sites, so it reads active sites only.

Nearest-neighbour upsampling only copies sites: its input must be zero at masked sites and a zero
input stays zero. Bilinear / area interpolation weights neighbours, and at the image border it
clamps (repeats the last row), which a masked canvas would turn into zeros: like average pooling it
becomes interpolate(x * m) / interpolate(m), a weighted mean over active sites that is the same with
or without masked canvas around. Bicubic weights can be negative (that ratio is unstable) and
``align_corners=True`` places samples by the canvas size: both are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._kinds import mixing_rule, statistic_rule
from ._registry import Decision, Info, NodeView, Unsupported, register_rule
from .pool import masked_average, masked_avg_pool

__all__ = ["masked_interpolate"]


def masked_interpolate(mask, input, *args, **kwargs):
    """Mask-aware ``F.interpolate`` for linear modes: the weighted mean of the active sites read."""
    if mask is None:
        return F.interpolate(input, *args, **kwargs)
    return masked_average(lambda t: F.interpolate(t, *args, **kwargs), input, mask)


def _broadcast_from_one_site(view: NodeView) -> Decision | None:
    """Upsampling a pooled vector from one site (1 x 1, ASPP's image-pool branch) is a broadcast, in any mode.

    The result is a per-site map like any other, but not zero at masked sites: the analysis masks it
    where a consumer needs it, so the pooled value reaches visible sites only.
    """
    x = view.arg(0, "input")
    info = view.info(x)
    if not isinstance(info, Info) or info.spatial is not None:
        return None
    shape, out = view.shape(x), view.shape()
    if not (isinstance(shape, torch.Size) and isinstance(out, torch.Size) and len(shape) == len(out) > 2):
        return None
    if any(s != 1 for s in shape[2:]):
        return None
    return Decision(out=Info(spatial=tuple(range(2, len(out))), zero=False, nonneg=info.nonneg))


def _interp_rule(mode_of, align_corners_of, masked):
    nearest = mixing_rule(zero_out=True)
    weighted = statistic_rule(masked)

    def rule(view: NodeView) -> Decision:
        broadcast = _broadcast_from_one_site(view)
        if broadcast is not None:
            return broadcast
        mode = mode_of(view)
        if mode == "nearest":
            return nearest(view)
        if mode not in ("linear", "bilinear", "trilinear", "area"):
            raise Unsupported(f"{mode} interpolation (only nearest, linear, bilinear, trilinear and area are "
                              "mask-aware)")
        if align_corners_of(view):
            raise Unsupported("interpolation with align_corners=True (sample positions depend on the "
                              "canvas size)")
        return weighted(view)

    return rule


register_rule(F.interpolate, _interp_rule(lambda v: v.arg(3, "mode", "nearest"),
                                          lambda v: v.arg(4, "align_corners", None), masked_interpolate))
register_rule(nn.Upsample, _interp_rule(lambda v: v.module.mode, lambda v: v.module.align_corners,
                                        masked_avg_pool))
register_rule(nn.UpsamplingNearest2d, _interp_rule(lambda v: "nearest", lambda v: None, masked_avg_pool))
register_rule(nn.UpsamplingBilinear2d, _interp_rule(lambda v: "bilinear", lambda v: True, masked_avg_pool))
