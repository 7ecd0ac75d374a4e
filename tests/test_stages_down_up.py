"""Down-up blocks inside a stage, parallel multi-resolution networks, and the spatial rank.

* A gating branch that pools by 2, convolves and interpolates back (GhostNetV2's DFC attention) or
  an hourglass block reaches a stride coarser than the maps the network ends with: the downsample
  ratio R is the stride of the coarsest map every path runs through, the internal coarser grid is
  masked (a cell is active where any of its sites is visible), and inputs must be multiples of
  ``enc.size_multiple`` (every size an error message suggests works).
* HRNet: ``stages="auto"`` gives one map per stride from the last fusion.
* The spatial rank comes from the first convolution the input reaches, not the majority rank.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo._patterns_cov_stages import REAL, DFCNet, HourglassStageNet, ParallelResNet

import sparsify
from sparsify.errors import SparsifyError
from sparsify.testing import assert_sparse_semantics

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_torch_thread")]


# --- the spatial rank: the first convolution the input reaches ----------------------------------------
class _ECA(nn.Module):
    """Efficient channel attention: a Conv1d over the pooled channel vector."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x):
        y = x.mean((2, 3)).unsqueeze(1)
        return x * torch.sigmoid(self.conv(y)).transpose(1, 2).unsqueeze(-1)


class ManyECANet(nn.Module):
    """Two Conv2d and three Conv1d (ECA), the ECA blocks registered first: the majority rank is 1."""

    def __init__(self):
        super().__init__()
        self.ecas = nn.ModuleList(_ECA() for _ in range(3))
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.ecas[0](F.relu(self.bn1(self.conv1(x))))
        x = self.ecas[1](F.relu(self.bn2(self.conv2(x))))
        return self.ecas[2](x)


@pytest.mark.parametrize("input_size", [None, 32])
def test_spatial_rank_comes_from_the_first_conv_the_input_reaches(input_size):
    enc = sparsify.wrap(ManyECANet(), input_size)
    assert enc.spatial_dims == 2 and enc.in_chans == 3
    assert enc.downsample_ratio == 4
    rows = sparsify.graph_node_names(ManyECANet(), input_size)
    assert any(r.stride == 4 for r in rows)


class FunctionalStemNet(nn.Module):
    """The first convolution is ``F.conv2d`` reading a Conv2d's weight; the next conv has other in_channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.down = nn.Conv2d(4, 4, 1, stride=4, groups=4, bias=False)
        self.eca = _ECA()

    def forward(self, x):
        c = self.stem
        x = F.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        return self.eca(self.down(F.relu(x)))


def test_in_chans_from_a_functional_first_conv():
    enc = sparsify.wrap(FunctionalStemNet(), 16)
    assert enc.in_chans == 1 and enc.spatial_dims == 2 and enc.downsample_ratio == 4


@pytest.mark.parametrize("eca_kernel", [1, 3])
def test_spatial_rank_with_a_standardised_first_conv_and_eca(eca_kernel):
    # The Hypothesis cases of tests/test_contract_random.py::test_batchnorm_nets_with_heads: timm's
    # StdConv2d (F.conv2d on a standardised weight) first, then ECA's Conv1d.
    from sparsify.testing.random_cnn import CNNSpec, ConvSpec, ECASpec, HeadSpec, build_cnn

    conv = dict(dilation=1, norm="bn", act="relu", bias=False, functional_act=False, pad_mode="conv")
    spec = CNNSpec(in_chans=2, blocks=(ConvSpec(out=4, kernel=3, stride=1, groups=2, conv="std", **conv),
                                       ConvSpec(out=4, kernel=1, stride=2, groups=4, conv="module", **conv),
                                       ECASpec(kernel=eca_kernel)),
                   head=HeadSpec(num_classes=1, pool="adaptive"), seed=0, spatial_dims=2)
    enc = sparsify.wrap(build_cnn(spec), (4, 8))
    assert enc.spatial_dims == 2 and enc.in_chans == 2


# --- down-up blocks inside a stage ---------------------------------------------------------------------
def _contract(model: nn.Module, size: tuple[int, ...], seed: int = 0):
    torch.manual_seed(seed)
    model = model.double()
    enc = sparsify.wrap(model, size)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grid = enc.mask_grid(*size)
    mask = torch.rand(2, 1, *grid, generator=torch.Generator().manual_seed(seed + 2)) > 0.5
    mask[0, 0, 0, 0] = mask[1, 0, -1, -1] = True
    assert_sparse_semantics(model, x, mask)  # train and eval, float64, ground truth from forward hooks
    return enc


def _suggested(message: str) -> list[tuple[int, ...]]:
    sizes = re.findall(r"(?:e\.g\.|like) (\d+(?:x\d+)*) or (\d+(?:x\d+)*)", message)
    assert sizes, f"the message suggests no size: {message}"
    return [tuple(int(v) for v in s.split("x")) for s in sizes[0]]


def test_dfc_gate_below_the_final_stride_keeps_the_contract():
    enc = _contract(DFCNet(), (64, 128))
    assert enc.feature_strides == [4, 8, 16, 32]
    assert enc.downsample_ratio == 32 and enc.patch_size == 32  # the maps it ends with, not the gate's 64
    assert enc.size_multiple == 64
    assert [s.module for s in enc.stages] == ["stages.0", "stages.1", "stages.2", "stages.3"]


def test_hourglass_block_inside_a_stage_keeps_the_contract():
    enc = _contract(HourglassStageNet(), (64, 128))
    assert enc.feature_strides == [4, 8, 16] and enc.downsample_ratio == 16 and enc.size_multiple == 64
    assert [s.module for s in enc.stages] == ["stem", "layer1", "layer2"]


def test_gate_mask_is_active_where_any_site_is_visible():
    # One visible patch: the stride-64 gate cell holding it is active, so the visible patch's features
    # are the dense model's computed from that patch alone (the contract's canvas check covers the rest).
    model = DFCNet().double().eval()
    enc = sparsify.wrap(model, (64, 64))
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    mask = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    mask[0, 0, 1, 0] = True
    with torch.no_grad():
        feats = enc(x, mask)
    last = feats[-1]
    assert last[..., 0, :].abs().max() == 0 and last[..., 1, 1].abs().max() == 0
    assert last[..., 1, 0].abs().max() > 0


@pytest.mark.parametrize("size", [(96, 96), (32, 32), (80, 128)])
def test_every_size_a_wrap_error_suggests_works(size):
    with pytest.raises(SparsifyError, match="size multiple 64") as info:
        sparsify.wrap(DFCNet(), size)
    assert "downsample ratio" in str(info.value) and "is 32" in str(info.value)
    for suggested in _suggested(str(info.value)):
        enc = sparsify.wrap(DFCNet(), suggested)
        assert enc.size_multiple == 64 and enc.downsample_ratio == 32


def test_every_size_a_run_time_error_suggests_works():
    from sparsify.spark import SparK

    enc = sparsify.wrap(DFCNet(), (64, 64))
    x = torch.randn(1, 3, 96, 96)
    with pytest.raises(SparsifyError, match="size multiple 64") as info:
        enc(x)
    for suggested in _suggested(str(info.value)):
        assert len(enc(torch.randn(2, 3, *suggested))) == 4
    spark = SparK(enc)
    with pytest.raises(SparsifyError, match="size multiple 64") as info:
        spark(torch.randn(2, 3, 96, 96))
    fitting = re.findall(r"e\.g\. (\d+)x(\d+)", str(info.value))[0]
    loss = spark(torch.randn(2, 3, int(fitting[0]), int(fitting[1])))
    loss = loss[0] if isinstance(loss, tuple) else loss
    assert torch.isfinite(loss)


def test_a_whole_unet_is_not_taken_for_a_down_up_block():
    # Every level below stride 1 is bypassed by a skip and decoded back. The down-up rule must not
    # shrink it to a stride-1 "pyramid": automatic stages refuse it as before (no single map at the
    # bottleneck), and the named contracting path wraps at R = 8.
    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.ModuleList([_cbr_(3, 8, 1), _cbr_(8, 8, 2), _cbr_(8, 8, 2), _cbr_(8, 8, 2)])
            self.dec = nn.ModuleList([_cbr_(8, 8, 1) for _ in range(3)])
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            skips = []
            for layer in self.enc:
                x = layer(x)
                skips.append(x)
            for layer, skip in zip(self.dec, reversed(skips[:-1])):
                x = layer(F.interpolate(x, scale_factor=2) + skip)
            return self.out(x)

    with pytest.raises(SparsifyError, match="final stride 8"):
        sparsify.wrap(UNet(), (32, 32))
    enc = sparsify.wrap(UNet(), (32, 32), stages=["enc.2", "enc.3"])
    assert enc.downsample_ratio == 8 and enc.size_multiple == 8


def _cbr_(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinySegNet(nn.Module):
    """A segmentation model as torchvision writes them: the input's size read first, a coarse
    image-pool branch, logits upsampled to the input, a dict output."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(_cbr_(3, 8, 2), _cbr_(8, 8, 2), _cbr_(8, 16, 2))
        self.head = _cbr_(16, 16, 1)
        self.pool_proj = nn.Conv2d(16, 16, 1)
        self.classifier = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        input_shape = x.shape[-2:]
        y = self.head(self.backbone(x))
        pooled = F.interpolate(self.pool_proj(F.avg_pool2d(y, 2)), size=y.shape[-2:], mode="bilinear",
                               align_corners=False)
        out = self.classifier(y + pooled)
        return {"out": F.interpolate(out, size=input_shape, mode="bilinear", align_corners=False)}


def test_segmentation_model_with_full_resolution_logits_gets_its_backbone_pyramid():
    # The logits at stride 1 are no pyramid, and the input's size handed to the last interpolate is
    # no path around the backbone: stages are found inside (the backbone's, as for a classifier's
    # head, the segmentation head is not part of the last stage).
    enc = _contract(TinySegNet(), (32, 48))
    assert enc.feature_strides == [4, 8] and enc.downsample_ratio == 8 and enc.size_multiple == 8
    assert [s.module for s in enc.stages] == ["backbone.1", "backbone.2"]


# --- parallel multi-resolution branches ---------------------------------------------------------------
def test_parallel_branches_give_one_map_per_stride_from_the_last_fusion():
    enc = _contract(ParallelResNet(), (64, 96))
    assert enc.feature_strides == [4, 8, 16, 32]
    assert [s.module for s in enc.stages] == ["incre.0", "incre.1", "incre.2", "incre.3"]
    assert enc.feature_channels == [16, 24, 32, 48]


# --- real models (timm, torchvision), pretrained=False ------------------------------------------------
_REAL = dict((name, (build, size)) for name, build, size in REAL)


@pytest.mark.slow
def test_ghostnetv2_dfc_attention():
    build, size = _REAL["ghostnetv2_100"]
    enc = _contract(build(), size)
    assert enc.downsample_ratio == 32 and enc.size_multiple == 64
    assert enc.feature_strides == [4, 8, 16, 32]


@pytest.mark.slow
def test_hrnet_four_levels_match_timm_feature_info():
    build, size = _REAL["hrnet_w18_small"]
    model = build()
    levels = [f for f in model.feature_info if f["reduction"] >= 4]
    enc = _contract(model, size)
    assert enc.feature_strides == [f["reduction"] for f in levels] == [4, 8, 16, 32]
    assert enc.feature_channels == [f["num_chs"] for f in levels]
    assert [s.module for s in enc.stages] == [f"incre_modules.{i}" for i in range(4)]


@pytest.mark.slow
@pytest.mark.parametrize("name, strides", [("fcn_resnet50", [4, 8]), ("deeplabv3_mobilenet_v3_large", [4, 8, 16]),
                                           ("lraspp_mobilenet_v3_large", [4, 8])])
def test_torchvision_segmentation_models_via_automatic_stages(name, strides):
    import torchvision.models.segmentation as segmentation

    model = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=3)
    enc = _contract(model, (64, 64))
    assert enc.feature_strides == strides and enc.size_multiple == strides[-1]
