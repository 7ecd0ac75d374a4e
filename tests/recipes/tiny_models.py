"""Tiny CNNs for the recipe tests, loaded through ``--model path/to/tiny_models.py:function``."""

from __future__ import annotations

from torch import nn


class TinyCNN(nn.Module):
    """Four stride-2 conv-BN-ReLU stages (strides 2, 4, 8, 16) and a classifier head."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 8) -> None:
        super().__init__()
        chans = [width, width * 2, width * 4, width * 4]
        layers = []
        c_in = in_chans
        for c in chans:
            layers.append(
                nn.Sequential(nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
            )
            c_in = c
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.stages(x)
        return self.fc(self.pool(x).flatten(1))


def tiny_cnn(num_classes: int = 10, in_chans: int = 3) -> TinyCNN:
    """The factory the tests pass as --model."""
    return TinyCNN(num_classes=num_classes, in_chans=in_chans)


def not_a_module() -> int:
    """A broken factory: returns something that is not a model."""
    return 3
