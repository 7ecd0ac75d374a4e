"""Hand-written networks for issue 17 item 6: atrous spatial pyramid pooling with an image-pool branch
(DeepLabV3-style heads kept in the encoder), and the real torchvision model of that family.

The image-pool branch averages the whole map to 1x1, convolves, normalises (BatchNorm over one value
per sample and channel) and broadcasts back; the projection after the concatenation ends with
``Dropout(0.5)``, dropout's most common rate. Written the way segmentation code spells them: the
size read from ``x.shape``, ``F.interpolate`` or ``expand`` back to the map, dilated convolutions,
a flag chosen in ``__init__``, a dict output with the low-level features.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PATTERNS", "REAL", "AsppImagePoolNet", "deeplabv3_mobilenet_encoder"]


def _conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _ImagePool(nn.Module):
    """Global average pool -> 1x1 conv -> BN -> ReLU -> back to the map (upsampled or broadcast)."""

    def __init__(self, cin: int, cout: int, broadcast: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.broadcast = broadcast

    def forward(self, x):
        h, w = x.shape[-2:]
        pooled = F.adaptive_avg_pool2d(x, 1) if not self.broadcast else x.mean(dim=(2, 3), keepdim=True)
        y = F.relu(self.bn(self.conv(pooled)))
        if self.broadcast:
            return y.expand(-1, -1, h, w)
        return F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)


class _Aspp(nn.Module):
    def __init__(self, cin: int, cout: int, rates: tuple[int, ...], broadcast: bool):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(cin, cout, 1)] +
                                      [_conv_bn_relu(cin, cout, 3, dilation=r) for r in rates])
        self.pool = _ImagePool(cin, cout, broadcast)
        self.project = nn.Sequential(nn.Conv2d(cout * (len(rates) + 2), cout, 1, bias=False), nn.BatchNorm2d(cout),
                                     nn.ReLU(inplace=True), nn.Dropout(0.5))

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x))
        return self.project(torch.cat(outs, dim=1))


class AsppImagePoolNet(nn.Module):
    """A small DeepLabV3-like encoder: an odd-padded stem, two strided stages, a dilated last stage
    (output stride 8) and the ASPP head with its image-pool branch; returns the low-level features
    and the ASPP output."""

    def __init__(self, in_chans: int = 3, width: int = 16, broadcast: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 5, 2, 2, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.layer1 = _conv_bn_relu(width, width, stride=2)
        self.layer2 = _conv_bn_relu(width, 2 * width, stride=2)
        self.layer3 = _conv_bn_relu(2 * width, 2 * width, dilation=2)  # output stride kept at 8
        self.aspp = _Aspp(2 * width, width, rates=(2, 3), broadcast=broadcast)

    def forward(self, x):
        low = self.layer1(self.stem(x))
        return {"low": low, "out": self.aspp(self.layer3(self.layer2(low)))}


def deeplabv3_mobilenet_encoder() -> nn.Module:
    """torchvision's deeplabv3_mobilenet_v3_large backbone and ASPP (``weights=None``), cut before the
    classifier's last convolutions: the ASPP output at output stride 16."""
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = model.backbone
            self.aspp = model.classifier[0]

        def forward(self, x):
            return {"out": self.aspp(self.backbone(x)["out"])}

    return Encoder()


PATTERNS: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("aspp_image_pool", AsppImagePoolNet, (64, 64)),
    ("aspp_image_pool_broadcast", lambda: AsppImagePoolNet(broadcast=True), (48, 64)),
]

REAL: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("deeplabv3_mobilenet_v3_large", deeplabv3_mobilenet_encoder, (32, 48)),
]
