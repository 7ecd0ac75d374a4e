"""Small random convolutional networks, described by a spec and built into plain ``nn.Module`` s.

A :class:`CNNSpec` is a frozen dataclass tree whose ``repr`` is valid Python (given
``from sparsify.testing.random_cnn import *``), so a failing Hypothesis example can be pasted into a
bug report and rebuilt exactly with :func:`build_cnn` (weights are drawn from ``spec.seed``).

Every generated network

* is fx-traceable (``torch.fx.symbolic_trace``): plain forwards, no shape-dependent Python branching;
* has a known total downsample ratio ``R`` (the product of its strides, exposed as
  ``net.downsample_ratio``), and maps an input of size ``(H, W)``, both multiples of ``R``, to a final
  feature map of exactly ``(H // R, W // R)``: every padding is chosen so sizes stay exact;
* is tiny (a few channels, a handful of blocks), so a forward pass takes milliseconds.

Ingredients: convolutions of kernel 1-7, stride 1-2, dilation, groups and depthwise; BatchNorm2d,
timm's BatchNormAct2d, LayerNorm over channels (permute -> nn.LayerNorm -> permute, and
``timm.layers.LayerNorm2d``), GroupNorm, InstanceNorm; max and average pooling (modules and
functional, with ``ceil_mode`` and ``count_include_pad``); squeeze-and-excitation blocks; residual
adds; channel concatenation and channel split (CSP-style); ConvNeXt-style channels-last blocks;
activations with ``f(0) != 0`` (sigmoid, hardsigmoid, softplus) besides relu / gelu / silu / ...;
and optionally a classification head (global pool -> flatten -> linear) that stage discovery must cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "ActSpec",
    "CNNSpec",
    "ConcatSpec",
    "ConvNeXtSpec",
    "ConvSpec",
    "HeadSpec",
    "PoolSpec",
    "RandomCNN",
    "ResidualSpec",
    "SESpec",
    "SplitSpec",
    "build_cnn",
]

#: Activation names understood by the builder. ``sigmoid``, ``hardsigmoid`` and ``softplus`` have
#: ``f(0) != 0``, so they turn a zero-at-masked tensor into a dirty one.
ACTIVATIONS: tuple[str, ...] = (
    "identity",
    "relu",
    "relu6",
    "leaky_relu",
    "gelu",
    "silu",
    "hardswish",
    "tanh",
    "sigmoid",
    "hardsigmoid",
    "softplus",
)

#: Normalisation names understood by the builder. ``"gn:<groups>"`` is GroupNorm with that many groups.
NORMS: tuple[str, ...] = ("none", "bn", "bnact", "gn", "ln2d", "timm_ln2d", "in")

_ACT_MODULES = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "hardswish": nn.Hardswish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "hardsigmoid": nn.Hardsigmoid,
    "softplus": nn.Softplus,
}

_ACT_FUNCTIONS = {
    "identity": lambda x: x,
    "relu": F.relu,
    "relu6": F.relu6,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.1),
    "gelu": F.gelu,
    "silu": F.silu,
    "hardswish": F.hardswish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "hardsigmoid": F.hardsigmoid,
    "softplus": F.softplus,
}


# ----------------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvSpec:
    """Conv2d -> norm -> activation. Padding is derived so that the output size is exactly input/stride.

    For ``stride == 1`` the kernel must be odd or the dilation even (``dilation * (kernel - 1)`` even).
    ``norm`` is one of :data:`NORMS` (``"gn:<groups>"`` for GroupNorm).
    """

    out: int
    kernel: int = 3
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    norm: str = "bn"
    act: str = "relu"
    bias: bool = False
    functional_act: bool = False

    @property
    def padding(self) -> int:
        """Symmetric padding that keeps ``out = in / stride`` exactly for even inputs."""
        return self.dilation * (self.kernel - 1) // 2

    def out_channels(self, cin: int) -> int:
        return self.out

    def total_stride(self) -> int:
        return self.stride


@dataclass(frozen=True)
class PoolSpec:
    """Max or average pooling (``kind`` is ``"max"`` or ``"avg"``).

    Size-exact configurations: (k=2, s=2, p=0), (k=3, s=2, p=1), (k=3, s=2, p=0, ceil_mode=True),
    (k=3, s=1, p=1).
    """

    kind: str = "max"
    kernel: int = 2
    stride: int = 2
    padding: int = 0
    ceil_mode: bool = False
    count_include_pad: bool = True
    functional: bool = False

    def out_channels(self, cin: int) -> int:
        return cin

    def total_stride(self) -> int:
        return self.stride


@dataclass(frozen=True)
class SESpec:
    """Squeeze-and-excitation: global mean -> 1x1 conv -> act -> 1x1 conv -> gate -> multiply.

    ``pool`` selects how the global mean is written: ``"mean"`` (``x.mean((2, 3), keepdim=True)``),
    ``"adaptive"`` (``nn.AdaptiveAvgPool2d(1)``) or ``"functional"`` (``F.adaptive_avg_pool2d``).
    """

    reduced: int = 2
    act: str = "relu"
    gate: str = "sigmoid"
    pool: str = "mean"

    def out_channels(self, cin: int) -> int:
        return cin

    def total_stride(self) -> int:
        return 1


@dataclass(frozen=True)
class ResidualSpec:
    """``act(body(x) + shortcut(x))``.

    ``shortcut`` is ``"identity"`` (needs stride 1 and equal channels), ``"conv"`` (strided 1x1 conv
    + BN) or ``"avgconv"`` (ResNet-D: 2x2 average pool when strided, then 1x1 conv + BN).
    """

    body: tuple[ConvSpec, ...]
    shortcut: str = "identity"
    act: str = "relu"

    def out_channels(self, cin: int) -> int:
        return self.body[-1].out

    def total_stride(self) -> int:
        return math.prod(b.stride for b in self.body)


@dataclass(frozen=True)
class ConcatSpec:
    """``torch.cat([branch(x) for branch in branches], dim=1)``; every branch has the same stride."""

    branches: tuple[tuple[ConvSpec, ...], ...]

    def out_channels(self, cin: int) -> int:
        return sum(branch[-1].out for branch in self.branches)

    def total_stride(self) -> int:
        return math.prod(b.stride for b in self.branches[0])


@dataclass(frozen=True)
class SplitSpec:
    """CSP-style: ``a, b = x.chunk(2, dim=1)``; ``cat([a, body(b)], dim=1)`` (input channels even)."""

    body: tuple[ConvSpec, ...]

    def out_channels(self, cin: int) -> int:
        return cin

    def total_stride(self) -> int:
        return 1


@dataclass(frozen=True)
class ConvNeXtSpec:
    """ConvNeXt block: depthwise conv -> permute -> LayerNorm -> Linear -> act -> Linear -> [scale] ->
    permute -> + x."""

    kernel: int = 7
    expansion: int = 2
    act: str = "gelu"
    layer_scale: bool = True

    def out_channels(self, cin: int) -> int:
        return cin

    def total_stride(self) -> int:
        return 1


@dataclass(frozen=True)
class ActSpec:
    """A bare activation (module or functional)."""

    act: str = "sigmoid"
    functional: bool = False

    def out_channels(self, cin: int) -> int:
        return cin

    def total_stride(self) -> int:
        return 1


@dataclass(frozen=True)
class HeadSpec:
    """Classification head: global pool -> flatten -> Linear; ``pool`` is ``"adaptive"`` or ``"mean"``."""

    num_classes: int = 3
    pool: str = "adaptive"


BlockSpec = ConvSpec | PoolSpec | SESpec | ResidualSpec | ConcatSpec | SplitSpec | ConvNeXtSpec | ActSpec


@dataclass(frozen=True)
class CNNSpec:
    """A whole network: ``blocks`` applied in order, then an optional ``head``.

    ``seed`` drives the weights (and BatchNorm running statistics, which are randomised so that eval
    mode is not trivially the identity).
    """

    in_chans: int
    blocks: tuple[BlockSpec, ...]
    head: HeadSpec | None = None
    seed: int = 0

    @property
    def downsample_ratio(self) -> int:
        """Total downsample ratio R: the product of every block's stride."""
        return math.prod(b.total_stride() for b in self.blocks)

    @property
    def out_channels(self) -> int:
        """Channels of the final feature map (before the head)."""
        c = self.in_chans
        for b in self.blocks:
            c = b.out_channels(c)
        return c


# ----------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------


class LayerNorm2dPermute(nn.Module):
    """LayerNorm over channels of an NCHW tensor, written as permute -> nn.LayerNorm -> permute
    (torchvision's ConvNeXt style)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        return x.permute(0, 3, 1, 2)


class FunctionalAct(nn.Module):
    """An activation applied as a function call in ``forward`` (traced as ``call_function``)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self._fn = _ACT_FUNCTIONS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)

    def extra_repr(self) -> str:
        return self.name


def make_act(name: str, functional: bool = False) -> nn.Module:
    """An activation module by name (see :data:`ACTIVATIONS`)."""
    if name not in _ACT_MODULES:
        raise ValueError(f"unknown activation {name!r}; choose from {ACTIVATIONS}")
    return FunctionalAct(name) if functional else _ACT_MODULES[name]()


def make_norm(name: str, channels: int) -> nn.Module:
    """A normalisation module over ``channels`` by name (see :data:`NORMS`)."""
    if name == "none":
        return nn.Identity()
    if name == "bn":
        return nn.BatchNorm2d(channels)
    if name == "bnact":
        from timm.layers import BatchNormAct2d

        return BatchNormAct2d(channels, act_layer=nn.ReLU)
    if name == "ln2d":
        return LayerNorm2dPermute(channels)
    if name == "timm_ln2d":
        from timm.layers import LayerNorm2d

        return LayerNorm2d(channels)
    if name == "in":
        return nn.InstanceNorm2d(channels, affine=True)
    if name == "gn" or name.startswith("gn:"):
        groups = int(name.split(":")[1]) if ":" in name else 1
        if channels % groups:
            raise ValueError(f"GroupNorm groups {groups} must divide channels {channels}")
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm {name!r}; choose from {NORMS} (or 'gn:<groups>')")


class ConvNormAct(nn.Module):
    """Conv2d -> norm -> activation, built from a :class:`ConvSpec`."""

    def __init__(self, cin: int, spec: ConvSpec) -> None:
        super().__init__()
        if cin % spec.groups or spec.out % spec.groups:
            raise ValueError(f"groups {spec.groups} must divide in ({cin}) and out ({spec.out}) channels")
        if spec.stride == 1 and spec.dilation * (spec.kernel - 1) % 2:
            raise ValueError(f"stride-1 conv needs an odd kernel or even dilation to keep its size: {spec}")
        if spec.stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2: {spec}")
        self.conv = nn.Conv2d(
            cin,
            spec.out,
            spec.kernel,
            stride=spec.stride,
            padding=spec.padding,
            dilation=spec.dilation,
            groups=spec.groups,
            bias=spec.bias,
        )
        self.norm = make_norm(spec.norm, spec.out)
        self.act = make_act(spec.act, spec.functional_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class Pool(nn.Module):
    """Max / average pooling, as a module or as a functional call, from a :class:`PoolSpec`."""

    def __init__(self, spec: PoolSpec) -> None:
        super().__init__()
        self.spec = spec
        if spec.kind == "max":
            self.pool = nn.MaxPool2d(spec.kernel, spec.stride, spec.padding, ceil_mode=spec.ceil_mode)
        elif spec.kind == "avg":
            self.pool = nn.AvgPool2d(
                spec.kernel,
                spec.stride,
                spec.padding,
                ceil_mode=spec.ceil_mode,
                count_include_pad=spec.count_include_pad,
            )
        else:
            raise ValueError(f"unknown pool kind {spec.kind!r}")
        if spec.functional:
            self.pool = _FunctionalPool(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)


class _FunctionalPool(nn.Module):
    def __init__(self, spec: PoolSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.kind == "max":
            return F.max_pool2d(x, s.kernel, s.stride, s.padding, ceil_mode=s.ceil_mode)
        return F.avg_pool2d(
            x, s.kernel, s.stride, s.padding, ceil_mode=s.ceil_mode, count_include_pad=s.count_include_pad
        )

    def extra_repr(self) -> str:
        return repr(self.spec)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation block, from an :class:`SESpec`."""

    def __init__(self, channels: int, spec: SESpec) -> None:
        super().__init__()
        self.mode = spec.pool
        if spec.pool == "adaptive":
            self.pool = nn.AdaptiveAvgPool2d(1)
        elif spec.pool not in ("mean", "functional"):
            raise ValueError(f"unknown SE pool {spec.pool!r}")
        self.fc1 = nn.Conv2d(channels, spec.reduced, 1)
        self.act = make_act(spec.act)
        self.fc2 = nn.Conv2d(spec.reduced, channels, 1)
        self.gate = make_act(spec.gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "adaptive":
            s = self.pool(x)
        elif self.mode == "functional":
            s = F.adaptive_avg_pool2d(x, 1)
        else:
            s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))

    def extra_repr(self) -> str:
        return f"pool={self.mode}"


class Residual(nn.Module):
    """``act(body(x) + shortcut(x))``, from a :class:`ResidualSpec`."""

    def __init__(self, cin: int, spec: ResidualSpec) -> None:
        super().__init__()
        layers = []
        c = cin
        for b in spec.body:
            layers.append(ConvNormAct(c, b))
            c = b.out
        self.body = nn.Sequential(*layers)
        stride = spec.total_stride()
        if spec.shortcut == "identity":
            if stride != 1 or c != cin:
                raise ValueError(f"identity shortcut needs stride 1 and equal channels: {spec}")
            self.shortcut = nn.Identity()
        elif spec.shortcut == "conv":
            self.shortcut = nn.Sequential(nn.Conv2d(cin, c, 1, stride=stride, bias=False), nn.BatchNorm2d(c))
        elif spec.shortcut == "avgconv":
            pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
            self.shortcut = nn.Sequential(
                pool if stride > 1 else nn.Identity(), nn.Conv2d(cin, c, 1, bias=False), nn.BatchNorm2d(c)
            )
        else:
            raise ValueError(f"unknown shortcut {spec.shortcut!r}")
        self.act = make_act(spec.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class Concat(nn.Module):
    """Channel concatenation of parallel branches, from a :class:`ConcatSpec`."""

    def __init__(self, cin: int, spec: ConcatSpec) -> None:
        super().__init__()
        strides = {math.prod(b.stride for b in branch) for branch in spec.branches}
        if len(strides) != 1:
            raise ValueError(f"concat branches need equal strides: {spec}")
        branches = []
        for branch in spec.branches:
            layers = []
            c = cin
            for b in branch:
                layers.append(ConvNormAct(c, b))
                c = b.out
            branches.append(nn.Sequential(*layers))
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class Split(nn.Module):
    """CSP-style split: half the channels pass through, the other half go through ``body``."""

    def __init__(self, cin: int, spec: SplitSpec) -> None:
        super().__init__()
        if cin % 2:
            raise ValueError(f"split needs an even channel count, got {cin}")
        layers = []
        c = cin // 2
        for b in spec.body:
            if b.stride != 1:
                raise ValueError(f"split body must keep the stride: {spec}")
            layers.append(ConvNormAct(c, b))
            c = b.out
        if c != cin // 2:
            raise ValueError(f"split body must keep the channels ({cin // 2}): {spec}")
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.cat([a, self.body(b)], dim=1)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block with a channels-last MLP, from a :class:`ConvNeXtSpec`."""

    def __init__(self, channels: int, spec: ConvNeXtSpec) -> None:
        super().__init__()
        if spec.kernel % 2 == 0:
            raise ValueError(f"ConvNeXt block needs an odd kernel: {spec}")
        self.dwconv = nn.Conv2d(channels, channels, spec.kernel, padding=spec.kernel // 2, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.fc1 = nn.Linear(channels, channels * spec.expansion)
        self.act = make_act(spec.act)
        self.fc2 = nn.Linear(channels * spec.expansion, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 0.5)) if spec.layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y))))
        if self.gamma is not None:
            y = y * self.gamma
        return x + y.permute(0, 3, 1, 2)


class Head(nn.Module):
    """Global pool -> flatten -> Linear, from a :class:`HeadSpec`."""

    def __init__(self, channels: int, spec: HeadSpec) -> None:
        super().__init__()
        self.mode = spec.pool
        self.pool = nn.AdaptiveAvgPool2d(1) if spec.pool == "adaptive" else nn.Identity()
        self.fc = nn.Linear(channels, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "adaptive":
            x = self.pool(x).flatten(1)
        else:
            x = x.mean((2, 3))
        return self.fc(x)


def _build_block(cin: int, spec: BlockSpec) -> nn.Module:
    if isinstance(spec, ConvSpec):
        return ConvNormAct(cin, spec)
    if isinstance(spec, PoolSpec):
        return Pool(spec)
    if isinstance(spec, SESpec):
        return SqueezeExcite(cin, spec)
    if isinstance(spec, ResidualSpec):
        return Residual(cin, spec)
    if isinstance(spec, ConcatSpec):
        return Concat(cin, spec)
    if isinstance(spec, SplitSpec):
        return Split(cin, spec)
    if isinstance(spec, ConvNeXtSpec):
        return ConvNeXtBlock(cin, spec)
    if isinstance(spec, ActSpec):
        return make_act(spec.act, spec.functional)
    raise TypeError(f"unknown block spec {spec!r}")


class RandomCNN(nn.Module):
    """A network built from a :class:`CNNSpec`: ``features`` (an ``nn.Sequential``) then ``head``.

    Attributes:
        spec: the spec it was built from.
        downsample_ratio: total stride R; an ``(H, W)`` input (multiples of R) gives an
            ``(H // R, W // R)`` final feature map.
        in_chans: input channels.
        out_channels: channels of the final feature map.
        num_classes: head outputs, or ``None`` when there is no head (the output is then the
            final feature map).
    """

    def __init__(self, spec: CNNSpec) -> None:
        super().__init__()
        self.spec = spec
        self.in_chans = spec.in_chans
        self.downsample_ratio = spec.downsample_ratio
        blocks = []
        c = spec.in_chans
        for b in spec.blocks:
            blocks.append(_build_block(c, b))
            c = b.out_channels(c)
        self.out_channels = c
        self.features = nn.Sequential(*blocks)
        self.head = Head(c, spec.head) if spec.head is not None else None
        self.num_classes = spec.head.num_classes if spec.head is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if self.head is not None:
            x = self.head(x)
        return x

    def output_shape(self, batch: int, size: tuple[int, int]) -> tuple[int, ...]:
        """Shape of ``forward``'s output for a ``(batch, in_chans, *size)`` input."""
        if self.num_classes is not None:
            return (batch, self.num_classes)
        r = self.downsample_ratio
        return (batch, self.out_channels, size[0] // r, size[1] // r)

    def extra_repr(self) -> str:
        return f"in_chans={self.in_chans}, downsample_ratio={self.downsample_ratio}, seed={self.spec.seed}"


def build_cnn(spec: CNNSpec) -> RandomCNN:
    """Build ``spec`` into a :class:`RandomCNN` with weights drawn from ``spec.seed``.

    Affine parameters of every normalisation layer and BatchNorm running statistics are randomised
    too (so eval mode differs from train mode and from the identity). The global torch RNG is left
    untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        net = RandomCNN(spec)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)):
                    if getattr(m, "weight", None) is not None:
                        m.weight.uniform_(0.5, 1.5)
                    if getattr(m, "bias", None) is not None:
                        m.bias.uniform_(-0.5, 0.5)
                if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
                    m.running_mean.normal_(0.0, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
    return net
