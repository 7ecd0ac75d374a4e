"""Hand-written architectures, one per pattern that teams write (issue 8), each small enough to check
in float64 in a second or two.

Every entry of :data:`CASES` names the submodules whose outputs are the expected feature pyramid:
the zoo test compares ``enc(x, None)`` with those modules' own outputs, captured by forward hooks on
the unmodified model (not with ``enc.dense_encoder()``, which shares the encoder's tracing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ._blocks import GRN, BasicBlock, ChannelGate, FrozenBatchNorm2d, SpatialGate, SqueezeExcite, conv_bn


@dataclass
class ZooCase:
    name: str
    build: Callable[[], nn.Module]
    stages: list[str]  # module names whose outputs are the pyramid, finest to coarsest
    input_size: tuple[int, int] = (32, 48)
    wrap_kwargs: dict = field(default_factory=dict)
    covers: str = ""  # the issue item it stands for
    needs: str = ""  # another branch whose work it needs ("" = this branch alone)


# --- 1. plain ResNet, functional activations ---------------------------------------------------------
class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = BasicBlock(8, 16, 2)
        self.layer3 = BasicBlock(16, 24, 2)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.pool(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --- 2. pre-activation ResNet --------------------------------------------------------------------------
class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride > 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.layer1 = PreActBlock(8, 8, 2)
        self.layer2 = PreActBlock(8, 16, 2)
        self.layer3 = PreActBlock(16, 32, 2)
        self.final_act = nn.Sequential(nn.BatchNorm2d(32), nn.ReLU())  # pre-activation nets end on a norm-act
        self.linear = nn.Linear(32, 5)

    def forward(self, x):
        out = self.final_act(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(out.mean([2, 3]))


# --- 3. SE with whole-map avg_pool2d and .view(b, c) -----------------------------------------------------
class SEResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 2), SqueezeExcite(8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), SqueezeExcite(16))
        self.layer3 = nn.Sequential(BasicBlock(16, 16, 2), SqueezeExcite(16))

    def forward(self, x):
        return self.layer3(self.layer2(self.layer1(self.stem(x))))


# --- 4. CBAM: channel max/min reductions, whole-map max pool ----------------------------------------------
class CBAMBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = BasicBlock(cin, cout, stride)
        self.channel = ChannelGate(cout)
        self.spatial = SpatialGate()

    def forward(self, x):
        return self.spatial(self.channel(self.body(x)))


class CBAMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.stage1 = CBAMBlock(8, 8, 2)
        self.stage2 = CBAMBlock(8, 16, 2)
        self.stage3 = CBAMBlock(16, 16, 2)

    def forward(self, x):
        return self.stage3(self.stage2(self.stage1(self.stem(x))))


# --- 5. ASPP with an image-pool branch (pooled BatchNorm, upsample from 1x1, concat) ---------------------
class ASPP(nn.Module):
    def __init__(self, cin, cout, rates=(1, 2)):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn(cin, cout, 1)] + [
            nn.Sequential(nn.Conv2d(cin, cout, 3, padding=r, dilation=r, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
            for r in rates])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False),
                                        nn.BatchNorm2d(cout), nn.ReLU())
        self.project = conv_bn(cout * (len(rates) + 2), cout, 1)

    def forward(self, x):
        size = x.shape[-2:]
        feats = [b(x) for b in self.branches]
        pooled = F.interpolate(self.image_pool(x), size=size, mode="bilinear", align_corners=False)
        return self.project(torch.cat(feats + [pooled], dim=1))


class DeepLabLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.layer1 = BasicBlock(8, 8, 2)
        self.layer2 = BasicBlock(8, 16, 2)
        self.aspp = ASPP(16, 12)

    def forward(self, x):
        return self.aspp(self.layer2(self.layer1(self.stem(x))))


# --- 6. ConvNeXt-V2 style: depthwise 7x7, channels-last LayerNorm, GRN with addcmul -----------------------
class V2Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 2 * dim)
        self.grn = GRN(2 * dim)
        self.pwconv2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.grn(F.gelu(self.pwconv1(self.norm(y)))))
        return x + y.permute(0, 3, 1, 2)


class ChannelsFirstLN(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtV2Like(nn.Module):
    def __init__(self, dims=(8, 16, 24)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), ChannelsFirstLN(dims[0]))
        self.stages = nn.ModuleList()
        self.downs = nn.ModuleList()
        for i, d in enumerate(dims):
            self.stages.append(nn.Sequential(V2Block(d), V2Block(d)))
            if i + 1 < len(dims):
                self.downs.append(nn.Sequential(ChannelsFirstLN(d), nn.Conv2d(d, dims[i + 1], 2, 2)))

    def forward(self, x):
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.downs):
                x = self.downs[i](x)
        return x


# --- 7. pointwise operators: lerp, addcdiv, where, maximum, comparisons ----------------------------------
class BlendBlock(nn.Module):
    def __init__(self, c, stride=1):
        super().__init__()
        self.a = conv_bn(c, c, 3, stride, act=False)
        self.b = conv_bn(c, c, 3, stride, act=False)
        self.register_buffer("mix", torch.tensor(0.3))

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        y = torch.lerp(a, b, self.mix)
        y = torch.addcdiv(y, a, b.abs() + 1.0, value=0.5)
        y = torch.where(y > 0, y, 0.1 * y)                     # leaky relu by hand
        return torch.maximum(y, torch.clamp(a, max=0.0)) + (b > 0.5).to(y.dtype) * b


class PointwiseZoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.s1 = BlendBlock(8, 2)
        self.s2 = BlendBlock(8, 2)
        self.s3 = BlendBlock(8, 2)

    def forward(self, x):
        return self.s3(self.s2(self.s1(self.stem(x))))


# --- 8. "same"-padding stem: explicit zero pads before strided conv and pools ----------------------------
class SamePadStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.conv = nn.Conv2d(3, 8, 3, 2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool_pad = nn.ConstantPad2d(1, 0.0)
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x):
        x = self.bn(self.conv(self.pad(x)))       # no activation: the max pool sees negative values
        return self.pool(self.pool_pad(x))


class SamePadNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = SamePadStem()
        self.layer1 = BasicBlock(8, 12, 2)
        self.layer2 = nn.Sequential(nn.ZeroPad2d(1), nn.AvgPool2d(3, 2), BasicBlock(12, 16))
        self.layer3 = BasicBlock(16, 16, 2)

    def forward(self, x):
        return self.layer3(self.layer2(self.layer1(self.stem(x))))


# --- 9. TF-style asymmetric F.pad before strided convs and pools ----------------------------------------
class TFSameConv(nn.Conv2d):
    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = (ih + sh - 1) // sh * sh - ih + kh - sh  # sizes are multiples of the stride: never < 0
        pw = (iw + sw - 1) // sw * sw - iw + kw - sw
        return super().forward(F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]))


class TFSameStage(nn.Module):
    def __init__(self, cin, cout, k, pool=False):
        super().__init__()
        self.conv = TFSameConv(cin, cout, k, 2)
        self.bn = nn.BatchNorm2d(cout)
        self.pool = pool

    def forward(self, x):
        x = F.silu(self.bn(self.conv(x)))
        if self.pool:  # a Python flag fixed at construction: traces fine
            x = F.max_pool2d(F.pad(x, (0, 1, 0, 1)), 3, 2)
        return x


class TFSameNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stage1 = TFSameStage(3, 8, 3, pool=True)
        self.stage2 = TFSameStage(8, 16, 3)
        self.stage3 = TFSameStage(16, 16, 5)

    def forward(self, x):
        return self.stage3(self.stage2(self.stage1(x)))


# --- 10. a timm fx-leaf block that traces fine (ConvMlp) inside an in-house net --------------------------
class TimmLeafNet(nn.Module):
    def __init__(self):
        super().__init__()
        from timm.layers import ConvMlp

        self.stem = conv_bn(3, 8, 3, 2)
        self.stage1 = nn.Sequential(conv_bn(8, 12, 3, 2), ConvMlp(12, 24, norm_layer=nn.BatchNorm2d))
        self.stage2 = nn.Sequential(conv_bn(12, 16, 3, 2), ConvMlp(16, 32, norm_layer=nn.BatchNorm2d))

    def forward(self, x):
        return self.stage2(self.stage1(self.stem(x)))


# --- 11. auxiliary head computed only in training --------------------------------------------------------
class AuxHeadNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.layer1 = BasicBlock(8, 8, 2)
        self.layer2 = BasicBlock(8, 16, 2)
        self.aux = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.layer1(self.stem(x))
        aux = self.aux(x) if self.training else None
        logits = self.fc(self.layer2(x).mean((2, 3)))
        if self.training:
            return logits, aux
        return logits


# --- 12. SE with BatchNorm over pooled vectors (both (B, C, 1, 1) and flattened (B, C)) -------------------
class BNSqueeze(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.reduce = nn.Conv2d(c, c // 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(c // 2)
        self.expand = nn.Linear(c // 2, c)
        self.bn1d = nn.BatchNorm1d(c)

    def forward(self, x):
        y = F.relu(self.bn(self.reduce(F.adaptive_avg_pool2d(x, 1))))
        y = torch.sigmoid(self.bn1d(self.expand(y.flatten(1))))
        return x * y[:, :, None, None]


class PooledBNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 2), BNSqueeze(8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BNSqueeze(16))

    def forward(self, x):
        return self.layer2(self.layer1(self.stem(x)))


# --- 13. frozen BatchNorm computed from buffers in forward (detectron2 style) ----------------------------
class FrozenConvBN(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 2, 1, bias=False)
        self.bn = FrozenBatchNorm2d(cout)

    def forward(self, x):
        return F.relu_(self.bn(self.conv(x)))


class FrozenBNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = FrozenConvBN(3, 8)
        self.layer2 = FrozenConvBN(8, 16)
        self.layer3 = FrozenConvBN(16, 16)

    def forward(self, x):
        return self.layer3(self.layer2(self.layer1(x)))


# --- 14. dropout flag passed as an argument -------------------------------------------------------------
class ConvDrop(nn.Module):
    def __init__(self, cin, cout, p):
        super().__init__()
        self.body = conv_bn(cin, cout, 3, 2)
        self.p = p

    def forward(self, x):
        return F.dropout(self.body(x), self.p, training=self.training)


class DropFlagNet(nn.Module):
    def __init__(self, p: float = 0.2):
        super().__init__()
        self.layer1 = conv_bn(3, 8, 3, 2)
        self.layer2 = ConvDrop(8, 16, p)
        self.layer3 = conv_bn(16, 16, 3, 2)

    def forward(self, x):
        return self.layer3(self.layer2(self.layer1(x)))


# --- 15. extra forward arguments with defaults -----------------------------------------------------------
class ExtraArgsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = conv_bn(3, 8, 3, 2)
        self.layer2 = conv_bn(8, 16, 3, 2)
        self.layer3 = conv_bn(16, 16, 3, 2)
        self.head = nn.Linear(16, 4)

    def forward(self, x, scale: float = 1.0, return_features: bool = False):
        f1 = self.layer1(x * scale)
        f3 = self.layer3(self.layer2(f1))
        if return_features:
            return f1, f3
        return self.head(f3.mean((2, 3)))


# --- 16. dict of pyramid features as the output ----------------------------------------------------------
class DictPyramidNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c2 = conv_bn(3, 8, 3, 4)
        self.c3 = conv_bn(8, 16, 3, 2)
        self.c4 = conv_bn(16, 24, 3, 2)

    def forward(self, x):
        c2 = self.c2(x)
        c3 = self.c3(c2)
        return {"c2": c2, "c3": c3, "c4": self.c4(c3)}


# --- 17. space-to-depth stem (pixel_unshuffle) -----------------------------------------------------------
class SpaceToDepthNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.PixelUnshuffle(4), conv_bn(48, 16, 3))
        self.layer1 = BasicBlock(16, 16, 2)
        self.layer2 = BasicBlock(16, 24, 2)

    def forward(self, x):
        return self.layer2(self.layer1(self.stem(x)))


# --- 18. MobileNet-style inverted residuals: depthwise, hardswish, SE with hardsigmoid --------------------
class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand=3, se=True):
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                nn.Hardswish())
        self.se = se
        if se:
            self.se_reduce = nn.Conv2d(mid, mid // 4, 1)
            self.se_expand = nn.Conv2d(mid // 4, mid, 1)
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.dw(self.expand(x))
        if self.se:
            s = F.adaptive_avg_pool2d(y, 1)
            y = y * F.hardsigmoid(self.se_expand(F.relu(self.se_reduce(s))))
        y = self.project(y)
        return x + y if self.use_res else y


class MobileLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.stage1 = nn.Sequential(InvertedResidual(8, 8, 2), InvertedResidual(8, 8, 1))
        self.stage2 = nn.Sequential(InvertedResidual(8, 16, 2), InvertedResidual(16, 16, 1, se=False))
        self.stage3 = InvertedResidual(16, 24, 2)

    def forward(self, x):
        return self.stage3(self.stage2(self.stage1(self.stem(x))))


# --- 19. DenseNet-style growth by concatenation, transitions with average pooling -----------------------
class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, feats):
        x = torch.cat(feats, 1)
        return self.conv(F.relu(self.norm(x)))


class DenseStage(nn.Module):
    def __init__(self, cin, growth, n):
        super().__init__()
        self.layers = nn.ModuleList([DenseLayer(cin + i * growth, growth) for i in range(n)])

    def forward(self, x):
        feats = [x]
        for layer in self.layers:
            feats.append(layer(feats))
        return torch.cat(feats, 1)


class DenseLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = DenseStage(8, 4, 2)
        self.trans1 = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1), nn.AvgPool2d(2))
        self.block2 = DenseStage(8, 4, 2)
        self.trans2 = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1), nn.AvgPool2d(2))
        self.block3 = DenseStage(8, 4, 2)

    def forward(self, x):
        x = self.block1(self.stem(x))
        x = self.block2(self.trans1(x))
        return self.block3(self.trans2(x))


# --- 20. Inception-style parallel branches with a stride-1 pool branch ----------------------------------
class InceptionBlock(nn.Module):
    def __init__(self, cin, c):
        super().__init__()
        self.b1 = conv_bn(cin, c, 1)
        self.b3 = nn.Sequential(conv_bn(cin, c, 1), conv_bn(c, c, 3))
        self.b5 = nn.Sequential(conv_bn(cin, c, 1), conv_bn(c, c, 5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, c, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


class InceptionLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.inc1 = nn.Sequential(nn.MaxPool2d(2), InceptionBlock(8, 4))
        self.inc2 = nn.Sequential(nn.MaxPool2d(2), InceptionBlock(16, 4))
        self.inc3 = nn.Sequential(nn.MaxPool2d(2), InceptionBlock(16, 6))

    def forward(self, x):
        return self.inc3(self.inc2(self.inc1(self.stem(x))))


# --- 21. weight standardisation written functionally, GroupNorm --------------------------------------
class WSConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class GNWSNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = nn.Sequential(WSConv(3, 8, 3, 2, 1), nn.GroupNorm(2, 8), nn.ReLU())
        self.layer2 = nn.Sequential(WSConv(8, 16, 3, 2, 1), nn.GroupNorm(4, 16), nn.ReLU())
        self.layer3 = nn.Sequential(WSConv(16, 16, 3, 2, 1), nn.GroupNorm(4, 16), nn.ReLU())

    def forward(self, x):
        return self.layer3(self.layer2(self.layer1(x)))


# --- 22. ShuffleNet-style channel split and shuffle -----------------------------------------------------
def channel_shuffle(x, groups):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    return torch.transpose(x, 1, 2).contiguous().view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, c, stride):
        super().__init__()
        self.stride = stride
        branch = c // 2 if stride == 1 else c
        self.branch = nn.Sequential(conv_bn(branch, c // 2, 1),
                                    conv_bn(c // 2, c // 2, 3, stride, groups=c // 2, act=False),
                                    conv_bn(c // 2, c // 2, 1))
        if stride > 1:
            self.proj = nn.Sequential(conv_bn(c, c, 3, stride, groups=c, act=False), conv_bn(c, c // 2, 1))

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat((a, self.branch(b)), 1)
        else:
            out = torch.cat((self.proj(x), self.branch(x)), 1)
        return channel_shuffle(out, 2)


class ShuffleLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.stage1 = nn.Sequential(ShuffleUnit(8, 2), ShuffleUnit(8, 1))
        self.stage2 = nn.Sequential(ShuffleUnit(8, 2), ShuffleUnit(8, 1))
        self.stage3 = ShuffleUnit(8, 2)

    def forward(self, x):
        return self.stage3(self.stage2(self.stage1(self.stem(x))))


# --- 23. hourglass: down, nearest upsample, skip add; then the pyramid ------------------------------------
class Hourglass(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.down = conv_bn(c, c, 3, 2)
        self.inner = conv_bn(c, c, 3)
        self.skip = conv_bn(c, c, 1)

    def forward(self, x):
        y = self.inner(self.down(x))
        return self.skip(x) + F.interpolate(y, scale_factor=2, mode="nearest")


class HourglassNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 4)
        self.hg = Hourglass(8)
        self.layer1 = BasicBlock(8, 16, 2)
        self.layer2 = BasicBlock(16, 16, 2)

    def forward(self, x):
        return self.layer2(self.layer1(self.hg(self.stem(x))))


# --- 24. GeM pooling gate, channel min with indices, maxout ---------------------------------------------
class GeMGate(nn.Module):
    def __init__(self, c, p=3.0):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        g = x.clamp(min=1e-6).pow(self.p).mean((-2, -1), keepdim=True).pow(1.0 / self.p)
        lo, idx = torch.min(x, dim=1, keepdim=True)
        return x * torch.sigmoid(self.fc(g)) + lo + idx.to(x.dtype) * 0.01


class Maxout(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.a = conv_bn(cin, cout, 3, stride, act=False)
        self.b = conv_bn(cin, cout, 3, stride, act=False)

    def forward(self, x):
        return torch.max(self.a(x), self.b(x))


class GeMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(Maxout(3, 8, 2), GeMGate(8))
        self.stage2 = nn.Sequential(Maxout(8, 16, 2), GeMGate(16))
        self.stage3 = nn.Sequential(Maxout(16, 16, 2), GeMGate(16))

    def forward(self, x):
        return self.stage3(self.stage2(self.stage1(x)))


# --- 25. ECA written with a 1-D conv across channels, squeeze/transpose --------------------------------------
class ECALayer(nn.Module):
    def __init__(self, k=3):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(x, 1)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * torch.sigmoid(y).expand_as(x)


class ECANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 2), ECALayer())
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), ECALayer())

    def forward(self, x):
        return self.layer2(self.layer1(self.stem(x)))


# --- 26. split attention (ResNeSt-like): radix split, softmax over the radix of pooled vectors ------------
class SplitAttention(nn.Module):
    def __init__(self, c, radix=2):
        super().__init__()
        self.radix = radix
        self.conv = conv_bn(c, c * radix, 3, groups=radix)
        self.fc1 = nn.Conv2d(c, c // 2, 1)
        self.fc2 = nn.Conv2d(c // 2, c * radix, 1)

    def forward(self, x):
        b = x.shape[0]
        first, second = torch.split(self.conv(x), x.shape[1], dim=1)
        gap = F.relu(self.fc1(F.adaptive_avg_pool2d(first + second, 1)))
        att = self.fc2(gap).view(b, self.radix, -1).softmax(dim=1).view(b, -1, 1, 1)
        a1, a2 = torch.split(att, x.shape[1], dim=1)
        return a1 * first + a2 * second


class SplitAttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.layer1 = nn.Sequential(conv_bn(8, 8, 3, 2), SplitAttention(8))
        self.layer2 = nn.Sequential(conv_bn(8, 16, 3, 2), SplitAttention(16))

    def forward(self, x):
        return self.layer2(self.layer1(self.stem(x)))


# --- 27. frozen stem: the model keeps some BatchNorms in eval mode while it trains ---------------------
class FrozenStemNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        for p in self.stem.parameters():
            p.requires_grad_(False)
        self.layer1 = BasicBlock(8, 8, 2)
        self.layer2 = BasicBlock(8, 16, 2)

    def train(self, mode: bool = True):
        super().train(mode)
        self.stem.eval()  # frozen: running statistics, never batch statistics
        return self

    def forward(self, x):
        return self.layer2(self.layer1(self.stem(x)))


# --- 28. per-channel buffers and layer scale -------------------------------------------------------------
class ScaledConv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.body = conv_bn(cin, cout, 3, 2)
        self.register_buffer("channel_scale", torch.rand(1, cout, 1, 1) + 0.5)
        self.gamma = nn.Parameter(torch.full((cout,), 0.5))

    def forward(self, x):
        y = self.body(x)
        return y * (self.channel_scale * 2.0) + self.gamma.view(1, -1, 1, 1) * y


class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = conv_bn(3, 8, 3, 2)
        self.layer2 = ScaledConv(8, 16)
        self.layer3 = ScaledConv(16, 16)

    def forward(self, x):
        return self.layer3(self.layer2(self.layer1(x)))


# --- 29. InstanceNorm + squeeze/unsqueeze gating on channel mean ----------------------------------------
class INNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.InstanceNorm2d(8, affine=True), nn.LeakyReLU(0.2))
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.InstanceNorm2d(16, affine=True), nn.LeakyReLU(0.2))
        self.layer3 = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.GroupNorm(1, 16), nn.ELU())

    def forward(self, x):
        return self.layer3(self.layer2(self.layer1(x)))


CASES: list[ZooCase] = [
    ZooCase("resnet", TinyResNet, ["layer1", "layer2", "layer3"], covers="baseline"),
    ZooCase("preact_resnet", PreActResNet, ["layer1", "layer2", "final_act"], covers="pre-activation"),
    ZooCase("se_resnet", SEResNet, ["layer1", "layer2", "layer3"], covers="3: whole-map avg_pool2d, .view(b, c)"),
    ZooCase("cbam", CBAMNet, ["stage1", "stage2", "stage3"], covers="3: torch.max(x, 1), whole-map max_pool2d"),
    ZooCase("deeplab_aspp", DeepLabLike, ["layer1", "aspp"], covers="3: ASPP image pool, pooled BN"),
    ZooCase("convnext_v2", ConvNeXtV2Like, ["stages.0", "stages.1", "stages.2"], input_size=(32, 64),
            covers="3: GRN with addcmul", needs="stages"),
    ZooCase("pointwise_ops", PointwiseZoo, ["s1", "s2", "s3"], covers="3: lerp, addcdiv, where, maximum"),
    ZooCase("same_pad_stem", SamePadNet, ["stem", "layer1", "layer2", "layer3"], input_size=(32, 64),
            covers="3: zero pad + pool / strided conv"),
    ZooCase("tf_same", TFSameNet, ["stage1", "stage2", "stage3"], covers="3: asymmetric F.pad"),
    ZooCase("timm_leaf", TimmLeafNet, ["stage1", "stage2"], covers="3: timm fx leaf traced through"),
    ZooCase("aux_head", AuxHeadNet, ["layer1", "layer2"], covers="3: training-only aux head"),
    ZooCase("pooled_bn", PooledBNNet, ["layer1", "layer2"], covers="3: BatchNorm over pooled vectors"),
    ZooCase("frozen_bn", FrozenBNNet, ["layer2", "layer3"], covers="1.2: frozen BN from buffers",
            needs="core-semantics"),
    ZooCase("dropout_flag", DropFlagNet, ["layer2", "layer3"], covers="1.1: training=self.training",
            needs="core-semantics"),
    ZooCase("extra_args", ExtraArgsNet, ["layer2", "layer3"], covers="2: forward(x, scale=1.0, ...)",
            needs="core-semantics"),
    ZooCase("dict_pyramid", DictPyramidNet, ["c2", "c3", "c4"], covers="dict output names its pyramid",
            needs="stages"),
    ZooCase("space_to_depth", SpaceToDepthNet, ["stem", "layer1", "layer2"], covers="2: space-to-depth stem",
            needs="core-semantics"),
    ZooCase("mobile", MobileLike, ["stage1", "stage2", "stage3"], covers="depthwise, hardswish, SE",
            needs="stages"),
    ZooCase("densenet", DenseLike, ["block2", "block3"], covers="concat growth, avg-pool transitions",
            needs="stages"),
    ZooCase("inception", InceptionLike, ["inc1", "inc2", "inc3"], covers="parallel branches"),
    ZooCase("gn_ws", GNWSNet, ["layer2", "layer3"], covers="weight standardisation, GroupNorm"),
    ZooCase("shufflenet", ShuffleLike, ["stage1", "stage2", "stage3"], covers="channel split and shuffle"),
    # automatic discovery ends the stride-4 stage after the down-up block, not at the stem (issue 17 item 4)
    ZooCase("hourglass", HourglassNet, ["hg", "layer1", "layer2"], covers="down-up with nearest upsample"),
    ZooCase("gem_minmax", GeMNet, ["stage2", "stage3"], covers="3: torch.min values+indices, maxout"),
    ZooCase("eca", ECANet, ["layer1", "layer2"], covers="ECA 1-D conv"),
    ZooCase("split_attention", SplitAttnNet, ["layer1", "layer2"], covers="softmax over radix"),
    ZooCase("frozen_stem", FrozenStemNet, ["layer1", "layer2"], covers="frozen BN (mixed train flags)"),
    ZooCase("scaled_buffers", ScaledNet, ["layer2", "layer3"], covers="1.2: buffer scaled by a constant",
            needs="core-semantics"),
    ZooCase("instance_norm", INNet, ["layer2", "layer3"], covers="InstanceNorm, GroupNorm(1)"),
]
