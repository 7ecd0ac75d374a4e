"""Stage discovery (design.md section 6): the end of each stage, returned pyramids, named stages.

The real-model check compares the automatic stages with timm's own ``feature_info`` taps, by forward
hooks on the unmodified model (tensors, not names).
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.feature_extraction import create_feature_extractor

import sparsify
from sparsify.rewrite import cut_graph_module
from sparsify.testing import assert_sparse_semantics
from sparsify.trace import trace


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors on a shared machine
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------
# Hand-written networks: the rule works from the graph and the module hierarchy alone
# ----------------------------------------------------------------------------------------------------


class ChannelsFirstLayerNorm(nn.Module):
    """The official ConvNeXt's own channels-first LayerNorm (not an nn.LayerNorm)."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class _ConvNeXtBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1 = nn.Linear(c, 2 * c)
        self.pw2 = nn.Linear(2 * c, c)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + y


class OfficialLayoutConvNeXt(nn.Module):
    """ConvNeXt as the official code writes it: ModuleLists looped over, each downsampling layer starting
    with a channels-first LayerNorm; optionally a per-site head norm + Identity (global_pool='' style)."""

    def __init__(self, dims=(8, 16, 32, 64), site_head: bool = False):
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), ChannelsFirstLayerNorm(dims[0]))])
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(ChannelsFirstLayerNorm(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, 2)))
        self.stages = nn.ModuleList([nn.Sequential(_ConvNeXtBlock(d)) for d in dims])
        self.site_head = site_head
        self.head_norm = ChannelsFirstLayerNorm(dims[-1])
        self.head = nn.Identity()
        self.fc = nn.Linear(dims[-1], 10)

    def forward(self, x):
        for i in range(4):
            x = self.downsample_layers[i](x)
            x = self.stages[i](x)
        if self.site_head:
            return self.head(self.head_norm(x))
        return self.fc(self.head_norm(x).mean((2, 3)))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        mid = cin * 6
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.residual else y


class TinyMobileNet(nn.Module):
    """Inverted residuals: the old rule ended each stage at the next block's expanded activation."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        cfg = [(8, 8, 2), (8, 8, 1), (8, 12, 2), (12, 16, 2), (16, 16, 1), (16, 24, 2)]
        self.blocks = nn.Sequential(*[_InvertedResidual(i, o, s) for i, o, s in cfg])
        self.head = nn.Sequential(nn.Conv2d(24, 96, 1, bias=False), nn.BatchNorm2d(96), nn.ReLU6())
        self.fc = nn.Linear(96, 10)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


class InlineResNet(nn.Module):
    """Residual blocks written inline in one forward (no block modules): stages end at the residual merge."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 4, 1)
        self.a1, self.a2 = nn.Conv2d(8, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 1, 1)
        self.down = nn.Conv2d(8, 16, 3, 2, 1)
        self.b1, self.b2 = nn.Conv2d(16, 16, 3, 1, 1), nn.Conv2d(16, 16, 3, 1, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.a2(F.relu(self.a1(x)))
        x = F.relu(self.down(x))
        x = x + self.b2(F.relu(self.b1(x)))
        return self.fc(x.mean((2, 3)))


class ChannelsLastDownsampleNet(nn.Module):
    """Inline stages with a channels-last LayerNorm (permute, LayerNorm, permute) starting the downsampling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, 4)
        self.a = nn.Conv2d(8, 8, 3, 1, 1)
        self.ds_norm = nn.LayerNorm(8)
        self.down = nn.Conv2d(8, 16, 2, 2)
        self.b = nn.Conv2d(16, 16, 3, 1, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.a(x)
        x = self.ds_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.down(x)
        return x + self.b(x)


def _stage_values(enc: sparsify.SparseEncoder, x: torch.Tensor) -> list[torch.Tensor]:
    """The stage maps of the dense encoder (the unmodified network cut at the stages)."""
    with torch.no_grad():
        return enc.dense_encoder()(x)


def _hooked(model: nn.Module, names: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of the named modules of the unmodified model (forward hooks)."""
    got: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o))
               for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [got[n] for n in names]


def _assert_same_maps(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert [tuple(t.shape) for t in ours] == [tuple(t.shape) for t in ref]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("site_head", [False, True], ids=["pooled_head", "per_site_head_norm"])
def test_official_layout_convnext_stages_end_before_downsample_and_head_norms(site_head):
    torch.manual_seed(0)
    model = OfficialLayoutConvNeXt(site_head=site_head).eval()
    enc = sparsify.wrap(model, (64, 64))
    assert [s.module for s in enc.stages] == ["stages.0", "stages.1", "stages.2", "stages.3"]
    assert enc.feature_channels == [8, 16, 32, 64] and enc.feature_strides == [4, 8, 16, 32]
    x = torch.randn(2, 3, 64, 64)
    _assert_same_maps(_stage_values(enc, x), _hooked(model, [s.module for s in enc.stages], x))


def test_inverted_residual_stages_are_block_outputs_not_expanded_activations():
    torch.manual_seed(0)
    model = TinyMobileNet().eval()
    enc = sparsify.wrap(model, (64, 64))
    # blocks.0-1 end stride 4, blocks.2 stride 8, blocks.3-4 stride 16, blocks.5 stride 32; head outside
    assert [s.module for s in enc.stages] == ["blocks.1", "blocks.2", "blocks.4", "blocks.5"]
    assert enc.feature_channels == [8, 12, 16, 24]
    x = torch.randn(2, 3, 64, 64)
    _assert_same_maps(_stage_values(enc, x), _hooked(model, ["blocks.1", "blocks.2", "blocks.4", "blocks.5"], x))


def test_inline_residual_stages_end_at_the_merge():
    torch.manual_seed(0)
    model = InlineResNet().eval()
    enc = sparsify.wrap(model, (32, 32))
    assert [(s.name, s.stride, s.module) for s in enc.stages] == [("add", 4, None), ("add_1", 8, None)]
    enc = sparsify.wrap(ChannelsLastDownsampleNet(), (32, 32))  # the stage ends before the permuted norm
    assert [(s.name, s.stride) for s in enc.stages] == [("add", 4), ("add_1", 8)]


def test_timm_convnext_without_pooling_ends_before_its_head_norm():
    # how the official SparK builds its encoder: the head's LayerNorm then Identity run at every site
    model = timm.create_model("convnext_atto", pretrained=False, global_pool="", num_classes=0).eval()
    enc = sparsify.wrap(model, (64, 64))
    assert enc.stages[-1].module == "stages.3" and enc.feature_channels == [40, 80, 160, 320]
    x = torch.randn(1, 3, 64, 64)
    _assert_same_maps(_stage_values(enc, x)[-1:], _hooked(model, ["stages.3"], x))


# ----------------------------------------------------------------------------------------------------
# stages=[module names], enc.stages, graph_node_names
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18():
    return timm.create_model("resnet18", pretrained=False).eval()


def test_module_names_resolve_to_the_module_output(resnet18):
    auto = sparsify.wrap(resnet18, (64, 64))
    named = sparsify.wrap(resnet18, (64, 64), stages=["layer1", "layer2", "layer3", "layer4"])
    assert [s.name for s in named.stages] == [s.name for s in auto.stages]
    assert [s.module for s in named.stages] == ["layer1", "layer2", "layer3", "layer4"]
    mixed = sparsify.wrap(resnet18, (64, 64), stages=["layer2", auto.stages[2].name])  # node names still work
    assert mixed.feature_strides == [8, 16] and mixed.stages[1].module == "layer3"


def test_stage_name_errors_say_what_to_do(resnet18):
    with pytest.raises(sparsify.SparsifyError, match="not a node of the traced graph nor a module"):
        sparsify.wrap(resnet18, (64, 64), stages=["layer1", "nope"])
    with pytest.raises(sparsify.SparsifyError, match="never calls as a whole"):
        sparsify.wrap(OfficialLayoutConvNeXt(), (64, 64), stages=["stages"])
    with pytest.raises(sparsify.SparsifyError, match="called 2 times"):  # torchvision reuses one ReLU
        sparsify.wrap(torchvision.models.resnet18(weights=None), (64, 64), stages=["layer1.0.relu"])
    with pytest.raises(sparsify.SparsifyError, match="whole stride"):
        sparsify.wrap(resnet18, (64, 64), stages=["fc"])


def test_graph_node_names_marks_the_automatic_stage_ends(resnet18):
    rows = sparsify.graph_node_names(resnet18, (64, 64))
    marked = sorted((r for r in rows if r.stage is not None), key=lambda r: r.stage)
    enc = sparsify.wrap(resnet18, (64, 64))
    assert [r.name for r in marked] == [s.name for s in enc.stages]
    assert [r.stage for r in marked] == [0, 1, 2, 3] and [r.stride for r in marked] == [4, 8, 16, 32]
    by_name = {r.name: r for r in rows}
    assert by_name["layer1_0_conv1"].module == "layer1.0.conv1" and by_name["layer1_0_conv1"].stage is None
    assert by_name["fc"].stride is None and by_name["fc"].shape == (2, 1000)
    assert "layer1" in repr(enc)  # the encoder shows each stage's module


# ----------------------------------------------------------------------------------------------------
# Backbones that return their scales
# ----------------------------------------------------------------------------------------------------


class UNetEncoder(nn.Module):
    """A UNet-style encoder returning [input, every level]: levels finer than stride 4 are left out."""

    def __init__(self):
        super().__init__()

        def level(i: int, o: int, s: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1), nn.BatchNorm2d(o), nn.ReLU())

        self.levels = nn.ModuleList([level(3, 8, 1), level(8, 12, 2), level(12, 16, 2), level(16, 24, 2),
                                     level(24, 32, 2)])

    def forward(self, x):
        feats = [x]
        for lv in self.levels:
            x = lv(x)
            feats.append(x)
        return feats


def _backbones():
    r18 = torchvision.models.resnet18
    return {
        "unet_encoder": (UNetEncoder, (64, 96), [4, 8, 16], [16, 24, 32]),
        "timm_features_only": (lambda: timm.create_model("mobilenetv3_small_100", pretrained=False,
                                                         features_only=True), (64, 96), [4, 8, 16, 32],
                               [16, 24, 48, 576]),
        "create_feature_extractor": (lambda: create_feature_extractor(
            r18(weights=None), {"layer4": "c5", "layer2": "c3", "layer3": "c4"}), (64, 96), [8, 16, 32],
            [128, 256, 512]),
        "IntermediateLayerGetter": (lambda: IntermediateLayerGetter(
            r18(weights=None), {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}), (64, 96),
            [4, 8, 16, 32], [64, 128, 256, 512]),
        "BackboneWithFPN": (lambda: resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                                        norm_layer=nn.BatchNorm2d), (128, 192),
                            [4, 8, 16, 32, 64], [256] * 5),
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(_backbones()))
def test_backbones_returning_their_scales_wrap_and_keep_the_contract(kind):
    build, size, strides, channels = _backbones()[kind]
    torch.manual_seed(0)
    model = build().eval()
    enc = sparsify.wrap(model, size)
    assert enc.feature_strides == strides and enc.feature_channels == channels
    x = torch.randn(2, 3, *size)
    returned = model(x)
    returned = list(returned.values()) if isinstance(returned, dict) else list(returned)
    expected = [t for t in returned if t.shape[-1] * strides[0] <= size[1]]  # stride >= 4, fine to coarse
    expected.sort(key=lambda t: -t.shape[-1])
    _assert_same_maps(_stage_values(enc, x), expected)
    results = assert_sparse_semantics(enc, input_size=size, batch=2, generator=torch.Generator().manual_seed(0))
    assert results and all(r.passed for r in results)


def test_returned_container_without_maps_is_refused():
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            return {"pooled": y.mean((2, 3)), "logits": y.amax((2, 3))}

    with pytest.raises(sparsify.SparsifyError, match="none of its entries"):
        sparsify.wrap(Pooled(), (32, 32))


# ----------------------------------------------------------------------------------------------------
# Real timm CNNs: automatic stages against timm's feature_info, by forward hooks
# ----------------------------------------------------------------------------------------------------

# The 10 timm models of tests/test_real_models.py, then every other timm CNN tried while building the rule
# (selecsls42b is left out: its feature_info modules return lists, so there is no single tensor to compare).
FEATURE_INFO_MODELS = [
    "resnet50", "resnet18d", "convnext_atto", "efficientnet_b0", "mobilenetv3_small_100", "regnety_002",
    "densenet121", "resnet50_gn", "cspresnet50", "vgg11_bn",
    "mobilenetv2_050", "mobilenetv3_large_100", "efficientnet_lite0", "mnasnet_050", "tinynet_e", "lcnet_050",
    "ghostnet_050", "regnetx_002", "resnetv2_50", "dla34", "ese_vovnet19b_dw", "rexnet_100", "mixnet_s",
    "fbnetc_100", "spnasnet_100", "hardcorenas_a", "repvgg_a0", "gernet_s", "resnext26ts", "cspdarknet53",
    "res2net50_14w_8s", "skresnet18", "efficientnetv2_rw_t", "mobileone_s0", "seresnext26d_32x4d", "dpn48b",
    "convnext_femto",
]

# Where timm's taps are not the end of a stage, or timm disagrees with itself (model -> strides):
KNOWN_DIFFERENT = {
    # timm taps the first (downsampling) stage at each stride; the stage ends two blocks later
    "ghostnet_050": {4, 8, 16, 32},
    # a 1x1 head conv: timm excludes it in rexnet (last entry of `features`) but includes mobilenetv3's
    # identical one (last entry of `blocks`); from the graph alone both are the container's last step
    "rexnet_100": {32},
    # timm taps gernet's head conv `final_conv` (outside `stages`) but not efficientnet's `conv_head`
    "gernet_s": {32},
    # the final BN+act of this pre-activation net: timm excludes it here (`conv5_bn_ac`) but includes
    # densenet121's `norm5`; both are the last step of `features`
    "dpn48b": {32},
}


def _feature_info_agreement(name: str) -> tuple[int, set[int]]:
    """(stages compared, strides where the automatic stage differs from timm's feature_info tap)."""
    model = timm.create_model(name, pretrained=False).eval()
    rows = sparsify.graph_node_names(model, (64, 64))
    marked = sorted((r for r in rows if r.stage is not None), key=lambda r: r.stage)
    assert marked, f"{name}: no stages found"
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = cut_graph_module(trace(model), [r.name for r in marked])(x)
    taps = {}  # the last tap at each stride, as features_only returns it
    for info in model.feature_info:
        taps[info["reduction"]] = info["module"]
    compared, different = 0, set()
    refs = _hooked(model, [taps.get(r.stride, "") for r in marked if r.stride in taps], x)
    refs_at = dict(zip([r.stride for r in marked if r.stride in taps], refs))
    for row, feature in zip(marked, ours):
        if row.stride not in refs_at:
            continue
        compared += 1
        ref = refs_at[row.stride]
        same = (isinstance(ref, torch.Tensor) and ref.shape == feature.shape
                and torch.allclose(ref, feature, rtol=1e-5, atol=1e-6))
        if not same:
            different.add(row.stride)
    return compared, different


@pytest.mark.slow
def test_automatic_stages_match_timm_feature_info():
    compared, different = 0, {}
    for name in FEATURE_INFO_MODELS:
        n, diff = _feature_info_agreement(name)
        compared += n
        if diff:
            different[name] = diff
    mismatches = sum(len(d) for d in different.values())
    assert compared >= 4 * len(FEATURE_INFO_MODELS)
    assert different == KNOWN_DIFFERENT, f"stages differing from feature_info: {different}"
    assert (compared - mismatches) / compared >= 0.95, f"{compared - mismatches}/{compared} agree"
