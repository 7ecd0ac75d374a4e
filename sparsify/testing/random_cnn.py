"""Small random convolutional networks, described by a spec and built into plain ``nn.Module`` s.

A :class:`CNNSpec` is a frozen dataclass tree whose ``repr`` is valid Python (given
``from sparsify.testing.random_cnn import *``), so a failing Hypothesis example can be pasted into a
bug report and rebuilt exactly with :func:`build_cnn` (weights are drawn from ``spec.seed``).

Every generated network

* is fx-traceable (``torch.fx.symbolic_trace``): plain forwards, no shape-dependent Python branching;
* has a known total downsample ratio ``R`` (the product of its strides, exposed as
  ``net.downsample_ratio``), and maps an input of size ``(H, W)``, both multiples of ``R``, to a final
  feature map of exactly ``(H // R, W // R)``: every padding is chosen so sizes stay exact;
* is tiny (a few channels, a handful of blocks), so a forward pass takes milliseconds;
* has ``spec.spatial_dims`` spatial dims (1: signals ``(B, C, L)``, 2: images, 3: volumes ``(B, C, D,
  H, W)``): one builder for every rank, each layer its rank's version (``Conv1d`` / ``Conv3d``,
  ``BatchNorm3d``, ``F.max_pool1d``, ...). timm's layers (``StdConv2d``, ``BatchNormAct2d``,
  ``GroupNormAct``, ``LayerNorm2d``) exist in 2-D only.

Ingredients: convolutions of kernel 1-7, stride 1-2, dilation, groups and depthwise, padded by the
conv itself, by an explicit ``F.pad`` or TF-"same" style (asymmetric), written as ``nn.Conv2d``,
functional ``F.conv2d`` or timm's weight-standardised ``StdConv2d``; BatchNorm2d, timm's
BatchNormAct2d and GroupNormAct, LayerNorm over channels (permute -> nn.LayerNorm -> permute, and
``timm.layers.LayerNorm2d``), GroupNorm, InstanceNorm; max and average pooling (modules and
functional, with ``ceil_mode`` and ``count_include_pad``, or after an explicit ``nn.ZeroPad2d``);
squeeze-and-excitation blocks (mean, sum, amax, adaptive avg / max pooling, whole-map
``F.avg_pool2d(x, x.size()[2:])`` / ``F.max_pool2d``, BatchNorm over the pooled vectors), ECA (1-D
conv across channels), GRN (ConvNeXt-V2 global response norm, also written with ``addcmul`` or
``lerp``), CBAM spatial attention (``torch.max`` / ``min`` / ``mean`` over channels, values and
indices) and ASPP's image-pool branch (global pool, 1x1 conv, BatchNorm, upsampled from 1x1 and
concatenated); residual adds; channel concatenation and channel split (CSP-style); ConvNeXt-style
channels-last blocks; down-up blocks (strided conv, then nearest / bilinear interpolation or a
transposed conv, merged by add or concat); activations with ``f(0) != 0`` (sigmoid, hardsigmoid,
softplus) besides relu / gelu / silu / ...; and optionally a classification head (global pool ->
flatten -> linear) that stage discovery must cut.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
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
    "DownUpSpec",
    "ECASpec",
    "GRNSpec",
    "HeadSpec",
    "ImagePoolSpec",
    "PoolSpec",
    "RandomCNN",
    "ResidualSpec",
    "SESpec",
    "SpatialGateSpec",
    "SplitSpec",
    "TIMM_2D_NORMS",
    "build_cnn",
    "every_ingredient_spec",
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

#: Normalisation names understood by the builder. ``"gn:<groups>"`` is GroupNorm with that many groups
#: (``"gnact:<groups>"`` timm's GroupNormAct).
NORMS: tuple[str, ...] = ("none", "bn", "bnact", "gn", "gnact", "ln2d", "timm_ln2d", "in")

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


_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}

#: Norms built from timm's 2-D layers: not available for other spatial ranks.
TIMM_2D_NORMS: tuple[str, ...] = ("bnact", "gnact", "timm_ln2d")

_BUILD_RANK = [2]  # the spatial rank of the network being built (set by RandomCNN)


@contextmanager
def _building(rank: int) -> Iterator[None]:
    _BUILD_RANK.append(rank)
    try:
        yield
    finally:
        _BUILD_RANK.pop()


def _rank() -> int:
    return _BUILD_RANK[-1]


def _nd(name: str, rank: int | None = None):
    """``nn.Conv2d`` -> ``nn.Conv1d`` / ``nn.Conv3d`` (and ``F.max_pool2d`` -> ...) for the rank
    being built: one builder for every rank."""
    rank = _rank() if rank is None else rank
    nd = name.replace("2d", f"{rank}d")
    return getattr(nn, nd) if hasattr(nn, nd) else getattr(F, nd)


# Forwards are traced by fx, where x.dim() is not a number: the rank is fixed when a module is built.
def _spatial(rank: int) -> tuple[int, ...]:
    return tuple(range(2, 2 + rank))


def _channels_last(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x.permute(0, *range(2, 2 + rank), 1)


def _channels_first(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x.permute(0, rank + 1, *range(1, rank + 1))


# ----------------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvSpec:
    """Conv2d -> norm -> activation. Padding is derived so that the output size is exactly input/stride.

    ``norm`` is one of :data:`NORMS` (``"gn:<groups>"`` for GroupNorm). ``pad_mode``:
    ``"conv"`` (the conv's own symmetric padding; for ``stride == 1`` the kernel must then be odd or
    the dilation even), ``"explicit"`` (the same amount by ``F.pad`` before an unpadded conv) or
    ``"same"`` (TF-style asymmetric ``F.pad``, more on the right/bottom; any kernel). ``conv``:
    ``"module"`` (``nn.Conv2d``), ``"functional"`` (``F.conv2d`` with the module's weights) or
    ``"std"`` (timm's weight-standardised ``StdConv2d``).
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
    pad_mode: str = "conv"
    conv: str = "module"

    @property
    def padding(self) -> int:
        """Symmetric padding that keeps ``out = in / stride`` exactly for even inputs."""
        return self.dilation * (self.kernel - 1) // 2

    @property
    def same_padding(self) -> tuple[int, int, int, int]:
        """TF-"same" ``F.pad`` amounts (left, right, top, bottom) for even inputs."""
        total = self.dilation * (self.kernel - 1)
        if self.stride == 2:
            total = max(total - 1, 0)
        lo = total // 2
        return (lo, total - lo, lo, total - lo)

    def out_channels(self, cin: int) -> int:
        return self.out

    def total_stride(self) -> int:
        return self.stride


@dataclass(frozen=True)
class PoolSpec:
    """Max or average pooling (``kind`` is ``"max"`` or ``"avg"``).

    Size-exact configurations: (k=2, s=2, p=0), (k=3, s=2, p=1), (k=3, s=2, p=0, ceil_mode=True),
    (k=3, s=1, p=1). ``zero_pad`` writes the padding as ``nn.ZeroPad2d`` followed by an unpadded pool
    (a "same"-padding stem: the zeros count, also for max pooling).
    """

    kind: str = "max"
    kernel: int = 2
    stride: int = 2
    padding: int = 0
    ceil_mode: bool = False
    count_include_pad: bool = True
    functional: bool = False
    zero_pad: bool = False  # the padding written as an explicit nn.ZeroPad2d before an unpadded pool

    def out_channels(self, cin: int) -> int:
        return cin

    def total_stride(self) -> int:
        return self.stride


@dataclass(frozen=True)
class SESpec:
    """Squeeze-and-excitation: global mean -> 1x1 conv -> act -> 1x1 conv -> gate -> multiply.

    ``pool`` selects how the global mean is written: ``"mean"`` (``x.mean((2, 3), keepdim=True)``),
    ``"adaptive"`` (``nn.AdaptiveAvgPool2d(1)``), ``"functional"`` (``F.adaptive_avg_pool2d``),
    ``"sum"`` (``x.sum((2, 3), keepdim=True)``), ``"amax"`` (``x.amax((2, 3), keepdim=True)``),
    ``"adaptive_max"`` (``nn.AdaptiveMaxPool2d(1)``), ``"whole_avg"`` / ``"whole_max"``
    (``F.avg_pool2d(x, x.size()[2:])`` / ``F.max_pool2d(x, x.shape[2:])``, then ``.view(b, c)`` and back)
    or ``"bn"`` (global mean -> 1x1 conv -> BatchNorm over the pooled (B, C, 1, 1) vectors).
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
class ECASpec:
    """Efficient channel attention: ``x * sigmoid(conv1d(mean over space, across channels))``."""

    kernel: int = 3

    def out_channels(self, cin: int) -> int:
        return cin

    def total_stride(self) -> int:
        return 1


@dataclass(frozen=True)
class GRNSpec:
    """ConvNeXt-V2 global response norm (channels-last): ``gamma * (x * N(x)) + beta + x`` with
    ``N(x) = G(x) / mean_c G(x)`` and ``G(x) = torch.norm(x, 2, dim=(1, 2))`` over space.

    ``form``: ``"plain"`` (as above), ``"addcmul"`` (``torch.addcmul(beta, gamma, x * N(x)) + x``, as
    timm writes it) or ``"lerp"`` (``torch.lerp(x, x * N(x), gamma) + beta``)."""

    form: str = "plain"

    def out_channels(self, cin: int) -> int:
        return cin

    def total_stride(self) -> int:
        return 1


@dataclass(frozen=True)
class DownUpSpec:
    """``merge(x, up(down(x)))``: a stride-2 :class:`ConvSpec` ``down`` back to the input width, then
    ``up`` = ``"nearest"`` / ``"bilinear"`` (``F.interpolate``), ``"upsample"`` (``nn.Upsample``) or
    ``"convT"`` (``nn.ConvTranspose2d(k=4, s=2, p=1)``), merged by ``"add"`` or ``"cat"``.
    Needs an even input size (it must come before the last downsampling step)."""

    down: ConvSpec
    up: str = "nearest"
    merge: str = "add"

    def out_channels(self, cin: int) -> int:
        return 2 * cin if self.merge == "cat" else cin

    def total_stride(self) -> int:
        return 1


@dataclass(frozen=True)
class SpatialGateSpec:
    """CBAM spatial attention: per-site channel statistics -> conv -> sigmoid -> multiply.

    ``stats`` picks the per-site reductions over channels, from ``"max"`` (``torch.max(x, 1)``
    values), ``"min"`` (``x.min(dim=1)``, values), ``"argmax"`` (``torch.max(x, 1)`` indices, scaled)
    and ``"mean"``."""

    stats: tuple[str, ...] = ("max", "mean")
    kernel: int = 7

    def out_channels(self, cin: int) -> int:
        return cin

    def total_stride(self) -> int:
        return 1


@dataclass(frozen=True)
class ImagePoolSpec:
    """ASPP-style: ``cat([conv1x1(x), up(pool -> 1x1 conv [-> BN] -> ReLU)])`` -> 1x1 conv back to the
    input width. ``up`` is ``"bilinear"``, ``"nearest"`` (``F.interpolate`` to the map size) or
    ``"expand"``; ``bn`` puts a BatchNorm over the pooled (B, C, 1, 1) vectors."""

    width: int = 2
    up: str = "bilinear"
    bn: bool = True

    def out_channels(self, cin: int) -> int:
        return cin

    def total_stride(self) -> int:
        return 1


@dataclass(frozen=True)
class HeadSpec:
    """Classification head: global pool -> flatten -> Linear; ``pool`` is ``"adaptive"`` or ``"mean"``."""

    num_classes: int = 3
    pool: str = "adaptive"


BlockSpec = (
    ConvSpec
    | PoolSpec
    | SESpec
    | ResidualSpec
    | ConcatSpec
    | SplitSpec
    | ConvNeXtSpec
    | ActSpec
    | ECASpec
    | GRNSpec
    | DownUpSpec
    | SpatialGateSpec
    | ImagePoolSpec
)


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
    spatial_dims: int = 2

    @property
    def downsample_ratio(self) -> int:
        """Total downsample ratio R: the product of every block's stride."""
        return math.prod(b.total_stride() for b in self.blocks)

    @property
    def min_train_batch(self) -> int:
        """Smallest batch that runs in train mode: 2 when a BatchNorm normalises pooled (B, C, 1, 1)
        vectors (one value per channel is an error in PyTorch itself), else 1."""
        pooled_bn = any(isinstance(b, SESpec) and b.pool == "bn" or isinstance(b, ImagePoolSpec) and b.bn
                        for b in self.blocks)
        return 2 if pooled_bn else 1

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
        self.rank = _rank()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _channels_first(self.norm(_channels_last(x, self.rank)), self.rank)


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
    if name in TIMM_2D_NORMS and _rank() != 2:
        raise ValueError(f"norm {name!r} is a timm 2-D layer; use bn, gn, ln2d or in for {_rank()}-D networks")
    if name == "bn":
        return _nd("BatchNorm2d")(channels)
    if name == "bnact":
        from timm.layers import BatchNormAct2d

        return BatchNormAct2d(channels, act_layer=nn.ReLU)
    if name == "ln2d":
        return LayerNorm2dPermute(channels)
    if name == "timm_ln2d":
        from timm.layers import LayerNorm2d

        return LayerNorm2d(channels)
    if name == "in":
        return _nd("InstanceNorm2d")(channels, affine=True)
    if name == "gnact" or name.startswith("gnact:"):
        from timm.layers import GroupNormAct

        groups = int(name.split(":")[1]) if ":" in name else 1
        if channels % groups:
            raise ValueError(f"GroupNorm groups {groups} must divide channels {channels}")
        return GroupNormAct(channels, num_groups=groups, act_layer=nn.SiLU)
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
        if spec.stride == 1 and spec.pad_mode != "same" and spec.dilation * (spec.kernel - 1) % 2:
            raise ValueError(f"stride-1 conv needs an odd kernel or even dilation to keep its size: {spec}")
        if spec.stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2: {spec}")
        if spec.pad_mode not in ("conv", "explicit", "same"):
            raise ValueError(f"unknown pad_mode {spec.pad_mode!r}")
        rank = _rank()
        self.pad: tuple[int, ...] | None = None
        if spec.pad_mode == "explicit":
            self.pad = (spec.padding,) * (2 * rank)
        elif spec.pad_mode == "same":
            self.pad = spec.same_padding[:2] * rank
        padding = spec.padding if spec.pad_mode == "conv" else 0
        kwargs = dict(stride=spec.stride, padding=padding, dilation=spec.dilation, groups=spec.groups, bias=spec.bias)
        self.functional = spec.conv == "functional"
        self.conv_fn = _nd("conv2d", rank)
        if spec.conv in ("module", "functional"):
            self.conv = _nd("Conv2d")(cin, spec.out, spec.kernel, **kwargs)
        elif spec.conv == "std":
            if rank != 2:
                raise ValueError("timm's StdConv2d is 2-D only")
            from timm.layers import StdConv2d

            self.conv = StdConv2d(cin, spec.out, spec.kernel, **kwargs)
        else:
            raise ValueError(f"unknown conv kind {spec.conv!r}")
        self.norm = make_norm(spec.norm, spec.out)
        self.act = make_act(spec.act, spec.functional_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        if self.functional:
            c = self.conv
            x = self.conv_fn(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        else:
            x = self.conv(x)
        return self.act(self.norm(x))


class Pool(nn.Module):
    """Max / average pooling, as a module or as a functional call, from a :class:`PoolSpec`."""

    def __init__(self, spec: PoolSpec) -> None:
        super().__init__()
        self.spec = spec
        self.pad = _nd("ZeroPad2d")(spec.padding) if spec.zero_pad else nn.Identity()
        if spec.zero_pad:
            spec = PoolSpec(spec.kind, spec.kernel, spec.stride, 0, spec.ceil_mode, spec.count_include_pad,
                            spec.functional)
        if spec.kind == "max":
            self.pool = _nd("MaxPool2d")(spec.kernel, spec.stride, spec.padding, ceil_mode=spec.ceil_mode)
        elif spec.kind == "avg":
            self.pool = _nd("AvgPool2d")(
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
        return self.pool(self.pad(x))


class _FunctionalPool(nn.Module):
    def __init__(self, spec: PoolSpec) -> None:
        super().__init__()
        self.spec = spec
        self.max_pool, self.avg_pool = _nd("max_pool2d"), _nd("avg_pool2d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.kind == "max":
            return self.max_pool(x, s.kernel, s.stride, s.padding, ceil_mode=s.ceil_mode)
        return self.avg_pool(
            x, s.kernel, s.stride, s.padding, ceil_mode=s.ceil_mode, count_include_pad=s.count_include_pad
        )

    def extra_repr(self) -> str:
        return repr(self.spec)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation block, from an :class:`SESpec`."""

    def __init__(self, channels: int, spec: SESpec) -> None:
        super().__init__()
        self.mode = spec.pool
        self.adaptive_avg, self.avg_pool, self.max_pool = (_nd("adaptive_avg_pool2d"), _nd("avg_pool2d"),
                                                           _nd("max_pool2d"))
        self.rank = _rank()
        if spec.pool == "adaptive":
            self.pool = _nd("AdaptiveAvgPool2d")(1)
        elif spec.pool == "adaptive_max":
            self.pool = _nd("AdaptiveMaxPool2d")(1)
        elif spec.pool not in ("mean", "functional", "sum", "amax", "whole_avg", "whole_max", "bn"):
            raise ValueError(f"unknown SE pool {spec.pool!r}")
        self.fc1 = _nd("Conv2d")(channels, spec.reduced, 1)
        self.bn = _nd("BatchNorm2d")(spec.reduced) if spec.pool == "bn" else nn.Identity()
        self.act = make_act(spec.act)
        self.fc2 = _nd("Conv2d")(spec.reduced, channels, 1)
        self.gate = make_act(spec.gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode in ("adaptive", "adaptive_max"):
            s = self.pool(x)
        elif self.mode == "functional":
            s = self.adaptive_avg(x, 1)
        elif self.mode == "sum":
            s = x.sum(_spatial(self.rank), keepdim=True) * 0.1
        elif self.mode == "amax":
            s = x.amax(_spatial(self.rank), keepdim=True)
        elif self.mode in ("whole_avg", "whole_max"):
            b, c = x.shape[0], x.shape[1]
            pooled = self.avg_pool(x, x.size()[2:]) if self.mode == "whole_avg" else self.max_pool(x, x.shape[2:])
            s = pooled.view(b, c).view(b, c, *(1,) * self.rank)
        else:
            s = x.mean(_spatial(self.rank), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.bn(self.fc1(s)))))

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
            self.shortcut = nn.Sequential(_nd("Conv2d")(cin, c, 1, stride=stride, bias=False),
                                          _nd("BatchNorm2d")(c))
        elif spec.shortcut == "avgconv":
            pool = _nd("AvgPool2d")(stride, stride, ceil_mode=True, count_include_pad=False)
            self.shortcut = nn.Sequential(
                pool if stride > 1 else nn.Identity(), _nd("Conv2d")(cin, c, 1, bias=False), _nd("BatchNorm2d")(c)
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
        self.dwconv = _nd("Conv2d")(channels, channels, spec.kernel, padding=spec.kernel // 2, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.fc1 = nn.Linear(channels, channels * spec.expansion)
        self.act = make_act(spec.act)
        self.fc2 = nn.Linear(channels * spec.expansion, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 0.5)) if spec.layer_scale else None
        self.rank = _rank()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _channels_last(self.dwconv(x), self.rank)
        y = self.fc2(self.act(self.fc1(self.norm(y))))
        if self.gamma is not None:
            y = y * self.gamma
        return x + _channels_first(y, self.rank)


class ECA(nn.Module):
    """Efficient channel attention, from an :class:`ECASpec`."""

    def __init__(self, channels: int, spec: ECASpec) -> None:
        super().__init__()
        if spec.kernel % 2 == 0:
            raise ValueError(f"ECA needs an odd kernel: {spec}")
        self.conv = nn.Conv1d(1, 1, spec.kernel, padding=spec.kernel // 2, bias=False)
        self.rank = _rank()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean(_spatial(self.rank)).unsqueeze(1)  # (B, 1, C)
        y = torch.sigmoid(self.conv(y)).squeeze(1)
        return x * y[(..., *(None,) * self.rank)]


class GRN(nn.Module):
    """ConvNeXt-V2 global response normalisation (channels-last inside), from a :class:`GRNSpec`."""

    def __init__(self, channels: int, spec: GRNSpec) -> None:
        super().__init__()
        self.form = spec.form
        self.rank = _rank()
        ones = (1,) * (self.rank + 1)
        self.gamma = nn.Parameter(torch.full((*ones, channels), 0.5))
        self.beta = nn.Parameter(torch.full((*ones, channels), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _channels_last(x, self.rank)
        gx = torch.norm(x, p=2, dim=tuple(range(1, self.rank + 1)), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        if self.form == "addcmul":
            x = torch.addcmul(self.beta, self.gamma, x * nx) + x
        elif self.form == "lerp":
            x = torch.lerp(x, x * nx, self.gamma) + self.beta
        else:
            x = self.gamma * (x * nx) + self.beta + x
        return _channels_first(x, self.rank)


class SpatialGate(nn.Module):
    """CBAM spatial attention, from a :class:`SpatialGateSpec`."""

    def __init__(self, channels: int, spec: SpatialGateSpec) -> None:
        super().__init__()
        self.stats = spec.stats
        self.conv = _nd("Conv2d")(len(spec.stats), 1, spec.kernel, padding=spec.kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = []
        for stat in self.stats:
            if stat == "max":
                maps.append(torch.max(x, 1)[0].unsqueeze(1))
            elif stat == "min":
                maps.append(x.min(dim=1, keepdim=True).values)
            elif stat == "argmax":
                maps.append(torch.max(x, 1, keepdim=True)[1].to(x.dtype) / x.shape[1])
            else:
                maps.append(torch.mean(x, 1, keepdim=True))
        return x * torch.sigmoid(self.conv(torch.cat(maps, 1)))

    def extra_repr(self) -> str:
        return f"stats={self.stats}"


class ImagePool(nn.Module):
    """ASPP's image-pool branch next to a per-site branch, from an :class:`ImagePoolSpec`."""

    def __init__(self, channels: int, spec: ImagePoolSpec) -> None:
        super().__init__()
        self.up = spec.up
        self.branch = _nd("Conv2d")(channels, spec.width, 1)
        self.pool_conv = _nd("Conv2d")(channels, spec.width, 1, bias=not spec.bn)
        self.pool_norm = _nd("BatchNorm2d")(spec.width) if spec.bn else nn.Identity()
        self.project = _nd("Conv2d")(2 * spec.width, channels, 1)
        self.adaptive_avg = _nd("adaptive_avg_pool2d")
        self.mode = _LINEAR[_rank()] if spec.up == "bilinear" else spec.up
        self.rank = _rank()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = F.relu(self.pool_norm(self.pool_conv(self.adaptive_avg(x, 1))))
        if self.up == "expand":
            p = p.expand(-1, -1, *(x.shape[d] for d in _spatial(self.rank)))
        else:
            p = F.interpolate(p, size=x.shape[2:], mode=self.mode,
                              align_corners=False if self.up == "bilinear" else None)
        return self.project(torch.cat([self.branch(x), p], 1))

    def extra_repr(self) -> str:
        return f"up={self.up}"


class DownUp(nn.Module):
    """Strided conv, back up by interpolation or a transposed conv, merged with the input."""

    def __init__(self, cin: int, spec: DownUpSpec) -> None:
        super().__init__()
        if spec.down.stride != 2 or spec.down.out != cin:
            raise ValueError(f"DownUp needs a stride-2 conv back to {cin} channels: {spec}")
        if spec.merge not in ("add", "cat"):
            raise ValueError(f"unknown merge {spec.merge!r}")
        self.spec = spec
        self.down = ConvNormAct(cin, spec.down)
        if spec.up == "convT":
            self.up = _nd("ConvTranspose2d")(cin, cin, 4, stride=2, padding=1)
        elif spec.up == "upsample":
            self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        elif spec.up in ("nearest", "bilinear"):
            self.up = None
        else:
            raise ValueError(f"unknown up {spec.up!r}")
        self.linear = _LINEAR[_rank()]  # "bilinear" in 2-D, "linear" / "trilinear" in 1-D / 3-D

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(x)
        if self.up is not None:
            y = self.up(y)
        elif self.spec.up == "bilinear":
            y = F.interpolate(y, scale_factor=2.0, mode=self.linear, align_corners=False)
        else:
            y = F.interpolate(y, scale_factor=2.0, mode="nearest")
        if self.spec.merge == "cat":
            return torch.cat([x, y], dim=1)
        return x + y

    def extra_repr(self) -> str:
        return f"up={self.spec.up}, merge={self.spec.merge}"


class Head(nn.Module):
    """Global pool -> flatten -> Linear, from a :class:`HeadSpec`."""

    def __init__(self, channels: int, spec: HeadSpec) -> None:
        super().__init__()
        self.mode = spec.pool
        self.pool = _nd("AdaptiveAvgPool2d")(1) if spec.pool == "adaptive" else nn.Identity()
        self.rank = _rank()
        self.fc = nn.Linear(channels, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "adaptive":
            x = self.pool(x).flatten(1)
        else:
            x = x.mean(_spatial(self.rank))
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
    if isinstance(spec, ECASpec):
        return ECA(cin, spec)
    if isinstance(spec, GRNSpec):
        return GRN(cin, spec)
    if isinstance(spec, DownUpSpec):
        return DownUp(cin, spec)
    if isinstance(spec, SpatialGateSpec):
        return SpatialGate(cin, spec)
    if isinstance(spec, ImagePoolSpec):
        return ImagePool(cin, spec)
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
        self.spatial_dims = spec.spatial_dims
        blocks = []
        c = spec.in_chans
        with _building(spec.spatial_dims):
            for b in spec.blocks:
                blocks.append(_build_block(c, b))
                c = b.out_channels(c)
            self.head = Head(c, spec.head) if spec.head is not None else None
        self.out_channels = c
        self.features = nn.Sequential(*blocks)
        self.num_classes = spec.head.num_classes if spec.head is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if self.head is not None:
            x = self.head(x)
        return x

    def output_shape(self, batch: int, size: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``forward``'s output for a ``(batch, in_chans, *size)`` input."""
        if self.num_classes is not None:
            return (batch, self.num_classes)
        r = self.downsample_ratio
        return (batch, self.out_channels, *(s // r for s in size))

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
                if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                                  nn.modules.instancenorm._InstanceNorm)):
                    if getattr(m, "weight", None) is not None:
                        m.weight.uniform_(0.5, 1.5)
                    if getattr(m, "bias", None) is not None:
                        m.bias.uniform_(-0.5, 0.5)
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                    m.running_mean.normal_(0.0, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
    return net


def every_ingredient_spec(in_chans: int = 3, seed: int = 1) -> CNNSpec:
    """A fixed spec using every ingredient at least once (R = 8, a 5-class head, 4 output channels).

    Useful as a deterministic smoke test next to the random ones; inputs must be multiples of 8 with
    the downsampled-by-4 size even, e.g. 16 x 24.
    """
    c = 4
    blocks: tuple[BlockSpec, ...] = (
        ConvSpec(out=c, kernel=4, stride=2, norm="bnact"),
        ConvSpec(out=c, kernel=3, dilation=2, groups=c, norm="gn:2", act="sigmoid", functional_act=True),
        ConvSpec(out=c, kernel=2, dilation=2, norm="ln2d", act="hardsigmoid"),
        ConvSpec(out=c, kernel=1, norm="timm_ln2d", act="softplus", bias=True),
        ConvSpec(out=c, kernel=5, norm="in", act="gelu"),
        PoolSpec("max", 3, 2, 0, ceil_mode=True),
        PoolSpec("avg", 3, 1, 1, count_include_pad=False, functional=True),
        SESpec(reduced=2, pool="adaptive", gate="hardsigmoid"),
        SESpec(reduced=1, pool="functional"),
        # at stride 4 the size is still even: down-up blocks go here
        DownUpSpec(down=ConvSpec(out=c, stride=2, kernel=2, pad_mode="same"), up="nearest"),
        DownUpSpec(down=ConvSpec(out=c, stride=2, kernel=3), up="bilinear"),
        DownUpSpec(down=ConvSpec(out=c, stride=2, kernel=3, conv="functional"), up="upsample"),
        DownUpSpec(down=ConvSpec(out=c, stride=2, kernel=4, norm="gn:1"), up="convT", merge="cat"),
        PoolSpec("avg", 3, 1, 1, count_include_pad=True),
        PoolSpec("max", 3, 1, 1, zero_pad=True),
        ResidualSpec(body=(ConvSpec(out=6, stride=2), ConvSpec(out=6)), shortcut="avgconv"),
        ConcatSpec(branches=((ConvSpec(out=2, kernel=7),), (ConvSpec(out=4, kernel=1), ConvSpec(out=2)))),
        SplitSpec(body=(ConvSpec(out=2, kernel=3, groups=2),)),
        ConvNeXtSpec(kernel=5, expansion=2),
        ActSpec("sigmoid", functional=True),
        ConvSpec(out=c, kernel=4, pad_mode="same", conv="std", norm="gnact:2"),
        ConvSpec(out=c, kernel=3, pad_mode="explicit", conv="functional", norm="bn"),
        SESpec(reduced=2, pool="amax"),
        SESpec(reduced=2, pool="adaptive_max"),
        SESpec(reduced=2, pool="sum"),
        ECASpec(kernel=3),
        GRNSpec(),
        GRNSpec(form="addcmul"),
        GRNSpec(form="lerp"),
        SpatialGateSpec(stats=("max", "mean", "min", "argmax"), kernel=3),
        SESpec(reduced=2, pool="whole_avg"),
        SESpec(reduced=2, pool="whole_max"),
        SESpec(reduced=2, pool="bn"),
        ImagePoolSpec(width=2, up="bilinear", bn=True),
        ImagePoolSpec(width=2, up="expand", bn=False),
        ResidualSpec(body=(ConvSpec(out=c, kernel=3, norm="bn"),), shortcut="identity", act="hardswish"),
    )
    return CNNSpec(in_chans=in_chans, blocks=blocks, head=HeadSpec(num_classes=5, pool="mean"), seed=seed)
