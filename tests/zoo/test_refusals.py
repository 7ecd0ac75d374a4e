"""Hand-written networks that cannot be made sparse: each is refused with a SparsifyError that names
the offending node and says why (issue 8, 1.3 and the refusals of design.md section 4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify

from ._blocks import conv_bn


class _Net(nn.Module):
    """Three strided stages with ``mid(x)`` between the first and the second."""

    def __init__(self):
        super().__init__()
        self.layer1 = conv_bn(3, 8, 3, 4)
        self.layer2 = conv_bn(8, 8, 3, 2)
        self.layer3 = conv_bn(8, 8, 3, 2)

    def mid(self, x):
        raise NotImplementedError

    def forward(self, x):
        return self.layer3(self.layer2(self.mid(self.layer1(x))))


class PositionalBiasAdded(_Net):
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, 8, 4, 4))

    def mid(self, x):
        return x + F.interpolate(self.pos_embed, size=x.shape[-2:], mode="bilinear", align_corners=False)


class CoordinatesAdded(_Net):
    def mid(self, x):
        h, w = x.shape[-2:]
        ys = torch.linspace(-1.0, 1.0, h, dtype=x.dtype).view(1, 1, h, 1)
        xs = torch.linspace(-1.0, 1.0, w, dtype=x.dtype).view(1, 1, 1, w)
        return x + ys + xs


class WindowMultiplied(_Net):
    def __init__(self):
        super().__init__()
        self.register_buffer("window", torch.hann_window(8).view(1, 1, 8, 1) * torch.hann_window(12).view(1, 1, 1, 12))

    def mid(self, x):
        return x * self.window  # a fixed map for one input size (32 x 48)


class CoordConv(_Net):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(10, 8, 1)

    def mid(self, x):
        b, _, h, w = x.shape
        ys = torch.linspace(-1.0, 1.0, h).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1.0, 1.0, w).view(1, 1, 1, w).expand(b, 1, h, w)
        return self.conv(torch.cat([x, ys, xs], 1))


class SelfAttention(_Net):
    def mid(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2)
        att = torch.softmax(t.transpose(1, 2) @ t, dim=-1)
        return (t @ att).view(b, c, h, w)


class CoordinateAttention(_Net):
    def mid(self, x):
        return x * torch.sigmoid(x.mean(3, keepdim=True)) * torch.sigmoid(x.amax(2, keepdim=True))


class Unfolded(_Net):
    def mid(self, x):
        b, c, h, w = x.shape
        return F.unfold(x, 3, padding=1).view(b, c, 9, h, w).mean(2)


class ReflectPadded(_Net):
    def mid(self, x):
        return F.pad(x, (1, 1, 1, 1), mode="reflect")[:, :, 1:-1, 1:-1]


class LogOfMasked(_Net):
    def mid(self, x):
        up = F.interpolate(x, scale_factor=2.0, mode="nearest")  # exactly 0 at masked sites
        return F.avg_pool2d(torch.log(up.square()), 2)  # log(0) = -inf there


class OneSpatialMax(_Net):
    def mid(self, x):
        return x * torch.max(x, 2, keepdim=True)[0]


REFUSED = [
    (PositionalBiasAdded, "fixed map", "add"),
    (CoordinatesAdded, "fixed map", "add"),
    (WindowMultiplied, "fixed shape", "mul"),
    (CoordConv, "varies over space", "cat"),
    (SelfAttention, "attention", "matmul"),
    (CoordinateAttention, "one spatial dim", "mean"),
    (Unfolded, "unfold", "unfold"),
    (ReflectPadded, "reflect", "pad"),
    (LogOfMasked, "not finite", "log"),
    (OneSpatialMax, "spatial dim", "max"),
]


@pytest.mark.parametrize("cls, reason, node", REFUSED, ids=[c.__name__ for c, _, _ in REFUSED])
def test_refused_with_the_node_named(cls, reason, node):
    torch.manual_seed(0)
    with pytest.raises(sparsify.SparsifyError) as info:
        sparsify.wrap(cls(), (32, 48))
    message = str(info.value)
    assert reason in message, message
    assert f"'{node}" in message, message  # the node is named
