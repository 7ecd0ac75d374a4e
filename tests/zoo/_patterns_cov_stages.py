"""Hand-written networks for issue 17 items 4 and 5: down-up blocks inside a stage (a DFC-attention
gate pooled below the network's final stride and interpolated back; an hourglass block) and a
parallel multi-resolution network (HRNet-style branches fused at every stride).

Written the way model code spells them: sizes read from ``x.shape``, functional pooling and
interpolation, a flag chosen in ``__init__``, odd kernels; plus the real timm models of the same
families (smallest variants, ``pretrained=False``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PATTERNS", "REAL", "DFCNet", "HourglassStageNet", "ParallelResNet"]


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _DFCGate(nn.Module):
    """Decoupled fully connected attention (GhostNetV2): the gate is computed at half resolution
    (avg-pool by 2, a 1x1 conv, 1x5 and 5x1 depthwise convs) and interpolated back."""

    def __init__(self, c: int, mode: str):
        super().__init__()
        self.main = _cbr(c, c, 3)
        self.short = nn.Sequential(
            nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c),
            nn.Conv2d(c, c, (1, 5), padding=(0, 2), groups=c, bias=False), nn.BatchNorm2d(c),
            nn.Conv2d(c, c, (5, 1), padding=(2, 0), groups=c, bias=False), nn.BatchNorm2d(c))
        self.mode = mode

    def forward(self, x):
        gate = torch.sigmoid(self.short(F.avg_pool2d(x, kernel_size=2, stride=2)))
        out = self.main(x)
        if self.mode == "size":
            gate = F.interpolate(gate, size=(out.shape[-2], out.shape[-1]), mode="nearest")
        else:
            gate = F.interpolate(gate, scale_factor=2, mode="nearest")
        return x + out * gate


class DFCNet(nn.Module):
    """Strides 4, 8, 16, 32 with a DFC gate in every stage, the last one pooling to stride 64."""

    def __init__(self, widths: tuple[int, ...] = (8, 12, 16, 24)):
        super().__init__()
        self.stem = nn.Sequential(_cbr(3, widths[0], 3, 2), _cbr(widths[0], widths[0], 3, 2))
        stages, cin = [], widths[0]
        for i, c in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(_cbr(cin, c, 3, stride), _DFCGate(c, "size" if i % 2 else "scale")))
            cin = c
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, 10)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(x.mean((2, 3)))


class _Hourglass(nn.Module):
    """A two-level hourglass: max-pool down twice, convolve, nearest upsample back, skip adds."""

    def __init__(self, c: int, depth: int = 2):
        super().__init__()
        self.skip = _cbr(c, c, 1)
        self.down = _cbr(c, c, 3)
        self.inner = _Hourglass(c, depth - 1) if depth > 1 else _cbr(c, c, 3)
        self.up = _cbr(c, c, 3, act=False)

    def forward(self, x):
        low = self.inner(self.down(F.max_pool2d(x, 2)))
        return F.relu(self.skip(x) + F.interpolate(self.up(low), scale_factor=2.0))


class HourglassStageNet(nn.Module):
    """Stages at strides 4, 8 and 16; the stride-16 stage holds a two-level hourglass (to stride 64)."""

    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 8, 5, 4)
        self.layer1 = _cbr(8, 12, 3, 2)
        self.layer2 = nn.Sequential(_cbr(12, 16, 3, 2), _Hourglass(16, 2))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ParallelResNet(nn.Module):
    """HRNet-style: a stride-4 stem, then branches at 4, 8, 16 and 32 kept in parallel, fused (each
    branch gets the others resized to its stride and added) twice; a classification head that
    widens each branch and chains them down to stride 32."""

    def __init__(self, widths: tuple[int, ...] = (8, 12, 16, 24)):
        super().__init__()
        self.widths = widths
        self.stem = nn.Sequential(_cbr(3, widths[0], 3, 2), _cbr(widths[0], widths[0], 3, 2))
        self.transition = nn.ModuleList(
            [nn.Identity()] + [_cbr(widths[0], c, 3, 2 ** i) for i, c in enumerate(widths[1:], 1)])
        self.blocks = nn.ModuleList(nn.ModuleList(_cbr(c, c, 3) for c in widths) for _ in range(2))
        self.fuse = nn.ModuleList(nn.ModuleList(nn.ModuleList(
            nn.Identity() if i == j else _cbr(widths[j], widths[i], 1, act=False) for j in range(len(widths)))
            for i in range(len(widths))) for _ in range(2))
        self.incre = nn.ModuleList(_cbr(c, 2 * c, 1) for c in widths)
        self.down = nn.ModuleList(_cbr(2 * widths[i], 2 * widths[i + 1], 3, 2) for i in range(len(widths) - 1))
        self.fc = nn.Linear(2 * widths[-1], 10)

    def _fuse(self, xs: list[torch.Tensor], layers: nn.ModuleList) -> list[torch.Tensor]:
        out = []
        for i, row in enumerate(layers):
            y = xs[i]
            for j, layer in enumerate(row):
                if j == i:
                    continue
                z = layer(xs[j])
                if j > i:
                    z = F.interpolate(z, size=xs[i].shape[-2:], mode="nearest")
                else:
                    z = F.avg_pool2d(z, kernel_size=2 ** (i - j))
                y = y + z
            out.append(F.relu(y))
        return out

    def forward(self, x):
        x = self.stem(x)
        xs = [t(x) for t in self.transition]
        for blocks, fuse in zip(self.blocks, self.fuse):
            xs = self._fuse([b(t) for b, t in zip(blocks, xs)], fuse)
        y = self.incre[0](xs[0])
        for i in range(1, len(xs)):
            y = self.incre[i](xs[i]) + self.down[i - 1](y)
        return self.fc(y.mean((2, 3)))


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    build.__name__ = name
    return build


PATTERNS: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("dfc_gate_net", DFCNet, (64, 128)),
    ("hourglass_stage_net", HourglassStageNet, (64, 128)),
    ("parallel_resolution_net", ParallelResNet, (64, 96)),
]

REAL: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("ghostnetv2_100", _timm("ghostnetv2_100"), (64, 64)),
    ("hrnet_w18_small", _timm("hrnet_w18_small"), (64, 64)),
]
