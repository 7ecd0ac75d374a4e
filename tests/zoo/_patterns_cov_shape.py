"""Hand-written networks for issue 17 item 2: space-to-depth and depth-to-space written by hand.

Each is written the way model code spells it: a TResNet-like stem that folds 4x4 blocks into
channels with view/permute/reshape (sizes read from ``x.shape``), the same with einops' functional
``rearrange`` and with its ``Rearrange`` layer, a channels-last variant, a 3-D (volume) stem, and a
block that goes down with one spelling and back up with the inverse (depth-to-space).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn

__all__ = ["PATTERNS", "REAL", "SpaceToDepthStem", "EinopsStem", "DepthToSpaceNet"]


def _space_to_depth(x: torch.Tensor, s: int) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.view(b, c, h // s, s, w // s, s)
    x = x.permute(0, 3, 5, 1, 2, 4).contiguous()  # TResNet's order: block offsets before channels
    return x.view(b, c * s * s, h // s, w // s)


class SpaceToDepthStem(nn.Module):
    """TResNet-like: space-to-depth by 4, a 3x3 conv, BN, a residual stage at stride 8 and 16."""

    def __init__(self, in_chans: int = 3, width: int = 16, block: int = 4):
        super().__init__()
        self.block = block
        self.conv1 = nn.Conv2d(in_chans * block * block, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(4, 2 * width)
        self.down2 = nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1)

    def forward(self, x):
        x = _space_to_depth(x, self.block)
        x = F.leaky_relu(self.bn1(self.conv1(x)), 0.01)
        y = self.gn(self.down(x))
        y = y + F.avg_pool2d(F.pad(y, (1, 1, 1, 1)), 3, stride=1)
        return F.relu(self.down2(F.relu(y)))


class EinopsStem(nn.Module):
    """Space-to-depth by 2 with ``einops.rearrange`` in the stem and ``Rearrange`` in a later stage,
    plus a channels-last LayerNorm written with einops (a relayout, not a space-to-depth)."""

    def __init__(self, in_chans: int = 3, width: int = 12):
        super().__init__()
        self.stem = nn.Conv2d(in_chans * 4, width, 3, padding=1)
        self.norm = nn.LayerNorm(width)
        self.fold = Rearrange("b c (h p1) (w p2) -> b (p1 p2 c) h w", p1=2, p2=2)
        self.conv = nn.Conv2d(width * 4, 2 * width, 1)
        self.bn = nn.BatchNorm2d(2 * width)

    def forward(self, x):
        x = rearrange(x, "b c (h p) (w q) -> b (c p q) h w", p=2, q=2)
        x = self.stem(x)
        x = rearrange(self.norm(rearrange(x, "b c h w -> b h w c")), "b h w c -> b c h w")
        x = self.conv(self.fold(F.gelu(x)))
        return self.bn(x).relu()


class DepthToSpaceNet(nn.Module):
    """Down by space-to-depth written with reshape/permute in channels-last order, a conv at the
    coarse grid, back up by depth-to-space (view/permute/reshape) and added to the skip."""

    def __init__(self, in_chans: int = 3, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, width, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.mid = nn.Conv2d(4 * width, 4 * width, 3, padding=1)
        self.out = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        b, c, h, w = x.shape
        y = x.permute(0, 2, 3, 1).reshape(b, h // 2, 2, w // 2, 2, c)
        y = y.permute(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c).permute(0, 3, 1, 2)
        y = F.silu(self.mid(y))
        z = y.view(b, c, 2, 2, h // 2, w // 2).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h, w)
        return self.out(x + z)


class SpaceToDepth3d(nn.Module):
    """A 3-D stem folding 2x2x2 blocks into channels with view/permute/reshape."""

    def __init__(self, in_chans: int = 3, width: int = 8):
        super().__init__()
        self.conv = nn.Conv3d(in_chans * 8, width, 3, padding=1)
        self.norm = nn.InstanceNorm3d(width, affine=True)
        self.down = nn.Conv3d(width, 2 * width, 3, stride=2, padding=1)

    def forward(self, x):
        b, c, d, h, w = x.shape
        x = x.reshape(b, c, d // 2, 2, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, c * 8, d // 2, h // 2, w // 2)
        return self.down(F.relu(self.norm(self.conv(x))))


def tresnet_stem() -> nn.Module:
    """timm's TResNet-M up to its first stage: its space-to-depth stem (timm's SpaceToDepth, a
    view/permute/view chain), conv1 and layer1. The whole network is refused on principle: its
    anti-aliased downsampling (layer2 on) reflect-pads before the blur, and a reflect pad copies
    sites across the border, which absent sites cannot honour."""
    import timm

    body = timm.create_model("tresnet_m", pretrained=False, num_classes=0).body
    return nn.Sequential(body.s2d, body.conv1, body.layer1)


PATTERNS: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("space_to_depth_stem", SpaceToDepthStem, (64, 96)),
    ("einops_space_to_depth", EinopsStem, (32, 48)),
    ("depth_to_space", DepthToSpaceNet, (32, 32)),
    ("space_to_depth_3d", SpaceToDepth3d, (8, 16, 8)),
]

REAL: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("tresnet_m_stem", tresnet_stem, (32, 48)),
]
