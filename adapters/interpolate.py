"""Interpolation / upsampling: mixes neighbouring sites, so its input must be zero at masked sites.

Nearest-neighbour upsampling only copies sites, so a zero input stays zero at masked sites.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ._kinds import mixing_rule
from ._registry import Decision, NodeView, register_rule


def _interp_rule(mode_of):
    base_zero = mixing_rule(zero_out=True)
    base = mixing_rule()

    def rule(view: NodeView) -> Decision:
        return (base_zero if mode_of(view) == "nearest" else base)(view)

    return rule


register_rule(F.interpolate, _interp_rule(lambda v: v.arg(3, "mode", "nearest")))
register_rule(nn.Upsample, _interp_rule(lambda v: v.module.mode))
register_rule(nn.UpsamplingNearest2d, _interp_rule(lambda v: "nearest"))
register_rule(nn.UpsamplingBilinear2d, _interp_rule(lambda v: "bilinear"))
