"""Real 3-D networks, unmodified and without weights: torchvision's video ResNets pass ``verify``.

Video stems stride (1, 2, 2), so the strides are per axis: r3d_18 and r2plus1d_18 have stages at
(2, 4, 4), (4, 8, 8) and (8, 16, 16) and mask patches of 8 frames x 16 x 16 pixels. ``verify`` checks
the whole contract (zero at masked sites, dense equality against the model's own hooked outputs,
canvas invariance at both ends of every axis, fully masked samples invisible, shared parameters) in
train and eval mode, at the given size and a variant one patch wider. Batch 1 keeps it affordable:
r3d_18 runs at (16, 64, 64); r2plus1d_18 (twice the cost per voxel) at the smallest size with two
patches along H and W, (8, 32, 32), and is wrapped at (16, 64, 64) to check its pyramid there.
"""

import pytest
import torch
import torchvision

import sparsify


def _wrapped(name, size):
    torch.manual_seed(0)
    enc = sparsify.wrap(getattr(torchvision.models.video, name)(weights=None), input_size=size)
    assert enc.spatial_dims == 3
    assert enc.feature_strides == [(2, 4, 4), (4, 8, 8), (8, 16, 16)]
    assert enc.downsample_ratio == (8, 16, 16) == enc.patch_size
    assert [s.module for s in enc.stages] == ["layer2", "layer3", "layer4"]
    return enc


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size"), [("r3d_18", (16, 64, 64)), ("r2plus1d_18", (8, 32, 32))])
def test_torchvision_video_resnet_passes_verify(name, size):
    enc = _wrapped(name, size)
    report = sparsify.verify(enc, batch=1)
    assert report.passed and report.sizes == [size, (*size[:2], size[2] + 16)]
    assert report.max_errors["zero at masked sites"] == 0.0


def test_r2plus1d_18_pyramid_at_16x64x64():
    enc = _wrapped("r2plus1d_18", (16, 64, 64))
    assert enc.mask_grid(16, 64, 64) == (2, 4, 4)
