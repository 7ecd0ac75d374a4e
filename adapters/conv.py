"""Convolutions in 1-D, 2-D and 3-D (incl. transposed and timm's weight-standardised / 'same' variants).

A convolution over inputs that are exactly zero at masked sites is the dense simulation of a sparse
convolution: absent sites contribute nothing. So convs keep their own forward; their rule only asks
for a zero input. Their output is not zero at masked sites (bias, active neighbours).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._kinds import mixing_rule
from ._registry import Decision, NodeView, Unsupported, register_rule

_mixing = mixing_rule()


def _module_rule(view: NodeView) -> Decision:
    # padding_mode="reflect"/"replicate"/"circular" pads with copies of border sites: see pad.py.
    mode = getattr(view.module, "padding_mode", "zeros")
    if mode != "zeros":
        raise Unsupported(f"convolution with padding_mode={mode!r} (only zero padding keeps absent sites "
                          "absent)")
    return _mixing(view)


# Every spatial rank: the rule only asks for a zero input, which is the same in 1-D, 2-D and 3-D.
for _t in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
           nn.LazyConv1d, nn.LazyConv2d, nn.LazyConv3d, nn.LazyConvTranspose1d, nn.LazyConvTranspose2d,
           nn.LazyConvTranspose3d):
    register_rule(_t, _module_rule)
for _t in (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
           torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
           torch.conv_transpose3d):
    register_rule(_t, mixing_rule(0, "input"))


def _register_timm() -> None:
    try:
        from timm.layers.cond_conv2d import CondConv2d
        from timm.layers.conv2d_same import Conv2dSame, conv2d_same
        from timm.layers.std_conv import ScaledStdConv2dSame, StdConv2dSame
    except ImportError:
        return
    for cls in (Conv2dSame, StdConv2dSame, ScaledStdConv2dSame, CondConv2d):
        register_rule(cls, _module_rule)
    register_rule(conv2d_same, mixing_rule(0, "x"))


_register_timm()
