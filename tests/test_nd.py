"""sparsify in 1-D and 3-D: the public API per rank, the contract on hand-written signal and volume
networks in float64, per-axis strides, finer mask patches, multi-output encoders and the errors."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import sparsify
from sparsify.testing import assert_sparse_semantics


def _block1d(cin, cout, stride):
    return nn.Sequential(nn.Conv1d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm1d(cout))


class BasicBlock1d(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(_block1d(cin, cout, stride), nn.ReLU(), _block1d(cout, cout, 1))
        self.down = _block1d(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.body(x) + self.down(x))


class ResNet1d(nn.Module):
    """A small 1-D ResNet for signals: strided stem, BatchNorm1d, MaxPool1d, residual stages, head."""

    def __init__(self, in_chans=2, width=8, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(in_chans, width, 7, 2, 3, bias=False), nn.BatchNorm1d(width),
                                  nn.ReLU(), nn.MaxPool1d(3, 2, 1))
        self.layer1 = BasicBlock1d(width, width, 1)
        self.layer2 = BasicBlock1d(width, 2 * width, 2)
        self.layer3 = BasicBlock1d(2 * width, 2 * width, 2)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def _conv_in(cin, cout, stride, affine=True, track=False):
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1),
                         nn.InstanceNorm3d(cout, affine=affine, track_running_stats=track), nn.LeakyReLU(0.01))


class Volume3d(nn.Module):
    """A small 3-D CNN with InstanceNorm3d and anisotropic strides (thick slices: (1, 2, 2) first)."""

    def __init__(self):
        super().__init__()
        self.stem = _conv_in(1, 4, 1)
        self.down1 = _conv_in(4, 6, (1, 2, 2))
        self.down2 = _conv_in(6, 8, 2, affine=False, track=True)
        self.down3 = nn.Sequential(nn.Conv3d(8, 8, 3, 2, 1), nn.BatchNorm3d(8), nn.ReLU(), nn.MaxPool3d((1, 2, 2)))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.down3(self.down2(self.down1(self.stem(x))))
        return self.head(x.mean((2, 3, 4)))


class ResEncoder3d(nn.Module):
    """A hand-written stand-in for dynamic_network_architectures' ResidualEncoder(return_skips=True):
    residual stages with InstanceNorm3d and nnU-Net-style per-stage strides, returning every skip."""

    def __init__(self, strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)), widths=(4, 6, 8, 8)):
        super().__init__()
        self.stem = _conv_in(1, widths[0], 1)
        stages, cin = [], widths[0]
        for stride, width in zip(strides, widths):
            stages.append(nn.ModuleDict({"conv": nn.Sequential(_conv_in(cin, width, stride),
                                                                nn.Conv3d(width, width, 3, 1, 1),
                                                                nn.InstanceNorm3d(width, affine=True)),
                                         "skip": nn.Conv3d(cin, width, 1, stride),
                                         "act": nn.LeakyReLU(0.01)}))
            cin = width
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage["act"](stage["conv"](x) + stage["skip"](x))
            skips.append(x)
        return skips


# --- the contract per rank, float64, train and eval -------------------------------------------------


def test_resnet1d_keeps_the_contract_at_length_512():
    torch.manual_seed(0)
    model = ResNet1d().double()
    results = assert_sparse_semantics(model, input_size=(512,), batch=2, ratio=0.5)
    assert {r.mode for r in results if r.mode} == {"train", "eval"}
    enc = sparsify.wrap(model, (512,))
    assert enc.spatial_dims == 1
    assert enc.feature_strides == [4, 8, 16] and enc.downsample_ratio == 16 == enc.patch_size
    assert enc.feature_channels == [8, 16, 16]


def test_volume3d_with_anisotropic_strides_keeps_the_contract():
    torch.manual_seed(0)
    model = Volume3d().double()
    assert_sparse_semantics(model, input_size=(8, 32, 32), batch=2, ratio=0.5)
    enc = sparsify.wrap(model, (8, 32, 32))
    assert enc.spatial_dims == 3
    assert enc.feature_strides == [(2, 4, 4), (4, 8, 8), (4, 16, 16)]
    assert enc.downsample_ratio == (4, 16, 16) == enc.patch_size
    assert enc.geometry.patch == (4, 16, 16) and enc.geometry.rank == 3
    assert enc.mask_grid(8, 32, 48) == (2, 2, 3)
    feats = enc(torch.randn(1, 1, 8, 32, 48, dtype=torch.float64),
                sparsify.random_mask(1, (2, 2, 3), 0.5))
    assert [tuple(f.shape[2:]) for f in feats] == [(4, 8, 12), (2, 4, 6), (2, 2, 3)]


def test_two_d_attributes_stay_ints():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 2, 1))
    enc = sparsify.wrap(model, 64)
    assert enc.spatial_dims == 2 and enc.input_size == (64, 64)
    assert enc.downsample_ratio == 8 and isinstance(enc.downsample_ratio, int)
    assert enc.feature_strides == [4, 8] and all(isinstance(s, int) for s in enc.feature_strides)
    assert enc.patch_size == 8 and enc.mask_grid(64, 32) == (8, 4)


def test_an_int_size_takes_the_rank_of_the_models_convolutions():
    enc = sparsify.wrap(ResNet1d(), 256)
    assert enc.input_size == (256,)
    enc = sparsify.wrap(Volume3d(), 32)
    assert enc.input_size == (32, 32, 32)


def test_graph_node_names_report_per_axis_strides():
    rows = sparsify.graph_node_names(Volume3d(), (8, 32, 32))
    by_name = {r.name: r for r in rows}
    assert by_name["down1_0"].stride == (1, 2, 2)
    assert by_name["down2_0"].stride == (2, 4, 4)
    assert by_name["stem_0"].stride == 1
    assert [r.stride for r in rows if r.stage is not None] == [(2, 4, 4), (4, 8, 8), (4, 16, 16)]


# --- multi-output encoders ----------------------------------------------------------------------------


def test_returned_skips_are_the_stages_and_module_names_work():
    torch.manual_seed(0)
    model = ResEncoder3d().double()
    enc = sparsify.wrap(model, (8, 32, 32))
    assert enc.feature_strides == [(2, 4, 4), (4, 8, 8)]  # stride >= 4 on some axis, as in 2-D
    named = sparsify.wrap(model, (8, 32, 32), stages=["stem", "stages.1.act", "stages.2.act", "stages.3.act"])
    assert named.feature_strides == [1, (1, 2, 2), (2, 4, 4), (4, 8, 8)]
    assert_sparse_semantics(named, torch.randn(2, 1, 8, 32, 32, dtype=torch.float64), ratio=0.5)


# --- a mask patch finer than the downsample ratio -----------------------------------------------------


def test_finer_patch_keeps_the_contract_and_ors_patches_at_coarse_stages():
    torch.manual_seed(0)
    model = ResEncoder3d().double()
    stages = ["stem", "stages.1.act", "stages.2.act", "stages.3.act"]
    enc = sparsify.wrap(model, (8, 32, 32), stages=stages, patch_size=(2, 4, 4))
    assert enc.downsample_ratio == (4, 8, 8) and enc.patch_size == (2, 4, 4)
    assert enc.mask_grid(8, 32, 32) == (4, 8, 8)
    assert_sparse_semantics(enc, torch.randn(2, 1, 8, 32, 32, dtype=torch.float64), ratio=0.6)
    # One visible patch: at the coarsest stage the cell holding it is active (any patch visible), the
    # rest stay exactly zero.
    mask = torch.zeros(1, 1, 4, 8, 8, dtype=torch.bool)
    mask[0, 0, 3, 5, 2] = True
    enc.eval()
    coarse = enc(torch.randn(1, 1, 8, 32, 32, dtype=torch.float64), mask)[-1][0]
    active = coarse.abs().sum(0) != 0
    expected = torch.zeros(2, 4, 4, dtype=torch.bool)
    expected[1, 2, 1] = True
    assert torch.equal(active, expected)


def test_patch_size_must_divide_the_ratio():
    with pytest.raises(sparsify.SparsifyError, match=r"patch_size \(3, 4, 4\) must divide"):
        sparsify.wrap(ResEncoder3d(), (8, 32, 32), patch_size=(3, 4, 4))
    with pytest.raises(sparsify.SparsifyError, match="patch_size must be an int or 3 ints|has 2 entries"):
        sparsify.wrap(ResEncoder3d(), (8, 32, 32), patch_size=(4, 4))


# --- errors -------------------------------------------------------------------------------------------


def _sizes_in(message: str) -> list[tuple[int, ...]]:
    found = re.search(r"use (?:e\.g\.|sizes like) (\S+) or (\S+?)[;.]?$", message)
    assert found, message
    return [tuple(int(v) for v in s.split("x")) for s in found.groups()]


def test_a_2d_model_given_a_3d_size_is_refused_clearly():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 2, 1))
    with pytest.raises(sparsify.SparsifyError, match=r"2-D network .* has 3 spatial dimensions; pass input_size as "
                                                     r"\(H, W\)"):
        sparsify.wrap(model, (16, 64, 64))
    with pytest.raises(sparsify.SparsifyError, match=r"3-D network: pass input_size as \(D, H, W\)"):
        sparsify.wrap(Volume3d())


def test_wrong_volume_size_names_the_per_axis_patch_and_sizes_that_work():
    with pytest.raises(sparsify.SparsifyError, match=r"8x30x32 is not a multiple .* \(4, 16, 16\)") as info:
        sparsify.wrap(Volume3d(), (8, 30, 32))
    for size in _sizes_in(str(info.value)):
        sparsify.wrap(Volume3d(), size)  # every size the error suggests works
    enc = sparsify.wrap(Volume3d(), (8, 32, 32))
    with pytest.raises(sparsify.SparsifyError, match=r"4x32x40 is not a multiple") as info:
        enc(torch.randn(1, 1, 4, 32, 40))
    for size in _sizes_in(str(info.value)):
        enc.eval()(torch.randn(1, 1, *size), sparsify.random_mask(1, enc.mask_grid(*size)))


def test_masks_and_inputs_of_the_wrong_rank_are_refused():
    enc = sparsify.wrap(Volume3d(), (8, 32, 32))
    with pytest.raises(sparsify.SparsifyError, match="2 spatial dimensions where the input has 3"):
        enc(torch.randn(2, 1, 8, 32, 32), torch.ones(2, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(sparsify.SparsifyError, match=r"volume batch \(B, C, D, H, W\)"):
        enc(torch.randn(2, 1, 32, 32))
    enc1 = sparsify.wrap(ResNet1d(), (64,))
    with pytest.raises(sparsify.SparsifyError, match=r"signal batch \(B, C, L\)"):
        enc1(torch.randn(2, 2, 8, 64))


class _Stride16(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(3 if i == 0 else 8, 8, 3, 2, 1), nn.BatchNorm2d(8),
                                                  nn.ReLU()) for i in range(4)])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def test_a_size_that_does_not_divide_the_total_stride_gets_the_stride_message_first():
    """Issue 19 item 3: a hand-written stride-16 network at 60 px names the stride, not the layers."""
    with pytest.raises(sparsify.SparsifyError) as info:
        sparsify.wrap(_Stride16(), 60)
    message = str(info.value)
    assert "downsample ratio 16" in message and "use e.g. 48x48 or 64x64" in message
    assert "cannot derive the mask" not in message
    for size in _sizes_in(message):
        sparsify.wrap(_Stride16(), size)


def test_3d_refusals_match_2d():
    """What 2-D refuses, 3-D and 1-D refuse alike: padding that invents values next to the border."""
    reflect = nn.Sequential(nn.Conv3d(1, 4, 3, 2, 1, padding_mode="reflect"), nn.Conv3d(4, 4, 3, 2, 1))
    with pytest.raises(sparsify.SparsifyError, match="padding_mode='reflect'"):
        sparsify.wrap(reflect, (8, 16, 16))
    replicate = nn.Sequential(nn.Conv1d(1, 4, 3, 2, 1), nn.ReplicationPad1d(1), nn.Conv1d(4, 4, 3, 2, 0))
    with pytest.raises(sparsify.SparsifyError, match="ReplicationPad1d"):
        sparsify.wrap(replicate, (64,))


def test_nnunet_style_plan_with_skips_from_stride_1_and_a_finer_patch():
    """nnU-Net's thick-slice plan [[1,1,1],[1,2,2],[2,2,2],[2,2,2],[1,2,2]] (R = (4, 16, 16)), the
    encoder's skips from stride 1 named as stages, and a mask patch finer than R (as nnssl's SparK3D
    masks blocks finer than the total stride): the whole contract in float64, train and eval."""
    torch.manual_seed(0)
    plan = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))
    model = ResEncoder3d(strides=plan, widths=(4, 4, 6, 6, 8)).double()
    skips = [f"stages.{i}.act" for i in range(5)]
    enc = sparsify.wrap(model, (8, 32, 32), stages=skips, patch_size=(2, 8, 8))
    assert enc.feature_strides == [1, (1, 2, 2), (2, 4, 4), (4, 8, 8), (4, 16, 16)]
    assert enc.downsample_ratio == (4, 16, 16) and enc.patch_size == (2, 8, 8)
    assert sparsify.wrap(model, (8, 32, 32)).feature_strides == [(2, 4, 4), (4, 8, 8), (4, 16, 16)]
    assert_sparse_semantics(enc, torch.randn(2, 1, 8, 32, 32, dtype=torch.float64), ratio=0.6)
