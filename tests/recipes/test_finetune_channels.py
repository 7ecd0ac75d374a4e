"""Fine-tuning reads the image channels a model runs on, space-to-depth stems included."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sparsify.recipes.finetune_loop import input_channels
from torch import nn


class SpaceToDepthNet(nn.Module):
    """A TResNet-style stem written by hand: 4x4 space-to-depth, then a conv on 16x the channels."""

    def __init__(self, image_channels: int = 3, block: int = 4) -> None:
        super().__init__()
        self.block = block
        self.stem = nn.Conv2d(image_channels * block * block, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(F.pixel_unshuffle(x, self.block))))
        return self.head(x.mean((2, 3)))


def test_space_to_depth_stem_runs_on_the_image_channels() -> None:
    model = SpaceToDepthNet(3, 4).train()
    before = model.bn.running_mean.clone()
    assert input_channels(model, (32, 32)) == 3  # the first conv takes 48 = 3 x 4 x 4
    assert model.training and model.bn.training  # modes restored
    torch.testing.assert_close(model.bn.running_mean, before)  # the probe ran in eval mode
    assert input_channels(SpaceToDepthNet(1, 2), (16, 16)) == 1


def test_first_conv_channels_win_when_they_run() -> None:
    rgba = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    assert input_channels(rgba, (16, 16)) == 4  # 4 runs, so 1 (= 4 / 2^2) is never tried
    assert input_channels(nn.Sequential(nn.Conv2d(3, 8, 3)), (16, 16)) == 3


def test_timm_tresnet_stem() -> None:
    import timm

    model = timm.create_model("tresnet_m", pretrained=False, num_classes=2)
    assert input_channels(model, (64, 64)) == 3
