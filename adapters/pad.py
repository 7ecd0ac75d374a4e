"""Zero padding: keeps a zero input zero, but shifts the grid (the output is not patch-aligned).

A convolution after it needs nothing more. A pool right after it (a "same"-padding stem written as
``ZeroPad2d`` + ``MaxPool2d``) sees the zeros the model itself puts around the border; it treats
masked sites the same way and runs unchanged on the zeroed input (see ``pool``), so a masked canvas
gives the same result as the image alone.

Reflect / replicate / non-zero constant padding copy or invent values next to the image border; a
masked canvas would change what they produce, so they are refused.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ._kinds import passthrough_nonspatial
from ._registry import Decision, Info, NodeView, Unsupported, register_rule


def _pad_rule(mode_value_of):
    def rule(view: NodeView) -> Decision:
        x = view.arg(0, "input")
        info = view.info(x)
        if info is None or info.spatial is None:
            return passthrough_nonspatial(view)
        mode, value = mode_value_of(view)
        pads = view.arg(1, "pad") if view.module is None else getattr(view.module, "padding", ())
        pads = pads if isinstance(pads, (tuple, list)) else (pads,)
        if any(isinstance(p, int) and p < 0 for p in pads):
            raise Unsupported("negative padding crops the map (spatial slicing)")
        if mode != "constant" or (value or 0) != 0:
            raise Unsupported(f"{mode} padding with value {value} (only zero padding keeps absent "
                              "sites absent)")
        return Decision(out=Info(spatial=info.spatial, zero=True, nonneg=info.nonneg, aligned=False, padded=True),
                        require_zero=[x])

    return rule


register_rule(F.pad, _pad_rule(lambda v: (v.arg(2, "mode", "constant"), v.arg(3, "value", None))))
for _cls in (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d):
    register_rule(_cls, _pad_rule(lambda v: ("constant", 0)))
for _cls in (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d):
    register_rule(_cls, _pad_rule(lambda v: ("constant", v.module.value)))


def _register_timm() -> None:
    try:
        from timm.layers.padding import pad_same
    except ImportError:
        return
    register_rule(pad_same, _pad_rule(lambda v: ("constant", v.arg(4, "value", 0))))


_register_timm()
