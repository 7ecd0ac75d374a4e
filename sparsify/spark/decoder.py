"""The light UNet decoder of SparK, generated from an encoder's feature pyramid, in 1, 2 or 3 dims.

The plan is derived from the encoder's feature strides (finest -> coarsest), for example
``[4, 8, 16, 32]``, or per axis for anisotropic networks, e.g. ``[(1, 2, 2), (2, 4, 4), (4, 8, 8)]``
for a video or thick-slice volume network. Decoding starts at the coarsest scale and walks to stride 1:

* one upsampling step per pair of neighbouring encoder scales, by that pair's integer stride ratio
  per axis (32 -> 16 is a x2 step, 12 -> 4 a x3 step, (2, 4, 4) -> (1, 2, 2) a x2 step on every axis,
  (2, 4, 4) -> (2, 2, 2) a (1, 2, 2) step); the densified encoder feature of every scale is *added* to
  the decoder's running map before the step that leaves that scale (a stride-1 scale is added after
  the last step);
* after the finest encoder scale, extra steps bring the map back to stride 1. The finest stride is
  split into its prime factors, largest first (4 -> x2, x2; 6 -> x3, x2; 7 -> x7), so a ResNet or
  ConvNeXt pyramid gets the paper's decoder exactly: five x2 steps from stride 32. Per axis, the
  factors of each axis are paired up largest first and an axis with fewer factors gets ratio 1 in the
  last steps (finest stride (2, 4, 4) -> steps (2, 2, 2), (1, 2, 2));
* every step is a transposed conv that leaves each axis with ratio 1 as it is (kernel 1, stride 1) and
  upsamples every other axis by exactly r (kernel 2r, stride r; padding r/2 for even r, and for odd r
  padding (r+1)/2 with one row of output padding), then conv3x3 - BN - ReLU6 - conv3x3 - BN (3x3x3 and
  BatchNorm3d for volumes, 3 and BatchNorm1d for signals);
* widths start at ``decoder_width`` at the coarsest scale and halve at every step (never below 1);
* a final 1x1 conv maps to the input's channel count. There is no output activation: the decoder
  predicts per-patch normalised pixels.

Where every axis agrees, strides and steps are plain ints (so 2-D plans read as before).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .._geometry import compact, per_axis
from ..errors import SparsifyError
from ._rank import BATCH_NORM, CONV, CONV_TRANSPOSE, check_rank

__all__ = ["decoder_steps", "decoder_widths", "upsampler", "UpBlock", "LightDecoder"]

Stride = int | tuple[int, ...]


def _per_axis_stride(s: object, rank: int, strides: Sequence[Stride]) -> tuple[int, ...]:
    values = (s,) * rank if not isinstance(s, (tuple, list)) else tuple(s)
    if len(values) != rank:
        raise SparsifyError(
            f"feature strides {list(strides)} must give one stride per spatial axis ({rank}) for each scale"
        )
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or int(v) < 1:
            raise SparsifyError(f"feature strides must be positive integers, got {list(strides)}")
        out.append(int(v))
    return tuple(out)


def _check_strides(strides: Sequence[Stride], spatial_dims: int = 2) -> list[tuple[int, ...]]:
    """The strides, finest -> coarsest, as per-axis tuples; a clear error unless every scale is a whole
    multiple of the previous one on every axis and coarser on at least one."""
    if len(strides) == 0:
        raise SparsifyError("the encoder reports no feature scales; SparK needs at least one")
    out = [_per_axis_stride(s, spatial_dims, strides) for s in strides]
    for fine, coarse in zip(out[:-1], out[1:]):
        if any(c < f or c % f for f, c in zip(fine, coarse)) or coarse == fine:
            shown = [compact(s) for s in out]
            if all(len(set(s)) == 1 for s in (fine, coarse)):
                ratio = f"{coarse[0]} / {fine[0]} is not an integer > 1"
            else:
                ratio = f"{coarse} / {fine} must be a whole number >= 1 on every axis and > 1 on one"
            raise SparsifyError(
                f"feature strides {shown} must increase from finest to coarsest and each must be an integer "
                f"multiple of the previous one ({ratio}); pick other stage "
                "nodes in sparsify.wrap(..., feature_nodes=...) so the decoder can upsample by whole ratios"
            )
    return out


def _prime_factors(n: int) -> list[int]:
    factors: list[int] = []
    p = 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def decoder_steps(feature_strides: Sequence[Stride], spatial_dims: int = 2) -> list[Stride]:
    """Upsampling ratio of every decoder step, coarsest first, for strides given finest -> coarsest.

    Each step is an int when every axis has the same ratio, else one int per axis.

    >>> decoder_steps([4, 8, 16, 32])
    [2, 2, 2, 2, 2]
    >>> decoder_steps([7])
    [7]
    >>> decoder_steps([(1, 2, 2), (2, 4, 4)], spatial_dims=3)
    [2, (1, 2, 2)]
    """
    strides = _check_strides(feature_strides, check_rank(spatial_dims))
    between = [tuple(c // f for f, c in zip(fine, coarse)) for fine, coarse in zip(strides[:-1], strides[1:])]
    factors = [sorted(_prime_factors(s), reverse=True) for s in strides[0]]
    num_extra = max((len(f) for f in factors), default=0)
    extra = [tuple(f[i] if i < len(f) else 1 for f in factors) for i in range(num_extra)]
    return [compact(step) for step in between[::-1] + extra]


def decoder_widths(decoder_width: int, num_steps: int) -> list[int]:
    """Widths of the decoder's maps: at the coarsest scale, then after each of ``num_steps`` steps."""
    return [max(1, decoder_width >> i) for i in range(num_steps + 1)]


def upsampler(channels: int, ratio: Stride, spatial_dims: int = 2) -> nn.Module:
    """Transposed conv whose output is exactly ``ratio`` times its input size on every axis.

    An axis with ratio r >= 2 gets kernel 2r and stride r; an axis with ratio 1 gets kernel 1 and
    stride 1, so it is not upsampled (a (1, 2, 2) step of a video or thick-slice network).
    """
    rank = check_rank(spatial_dims)
    if isinstance(ratio, int) and ratio < 2:
        raise SparsifyError(f"an upsampling step needs an integer ratio >= 2, got {ratio}")
    ratios = per_axis(ratio, rank, "upsampling ratio")
    if max(ratios) < 2:
        raise SparsifyError(f"an upsampling step needs a ratio >= 2 on at least one axis, got {ratio}")
    kernel = tuple(2 * r if r > 1 else 1 for r in ratios)
    padding = tuple((r + 1) // 2 if r > 1 else 0 for r in ratios)
    output_padding = tuple(2 * p - r if r > 1 else 0 for p, r in zip(padding, ratios))  # 1 for odd r
    return CONV_TRANSPOSE[rank](
        channels,
        channels,
        kernel_size=compact(kernel),
        stride=compact(ratios),
        padding=compact(padding),
        output_padding=compact(output_padding),
    )


class UpBlock(nn.Module):
    """One decoder step: upsample by ``ratio``, then conv3x3 - BN - ReLU6 - conv3x3 - BN.

    ``spatial_dims`` picks the 1-D, 2-D or 3-D convolutions and BatchNorms; ``ratio`` is an int or one
    int per axis.
    """

    def __init__(self, in_channels: int, out_channels: int, ratio: Stride, spatial_dims: int = 2) -> None:
        super().__init__()
        rank = check_rank(spatial_dims)
        self.ratio = ratio
        self.up = upsampler(in_channels, ratio, rank)
        conv, norm = CONV[rank], BATCH_NORM[rank]
        self.conv = nn.Sequential(
            conv(in_channels, in_channels, 3, padding=1, bias=False),
            norm(in_channels),
            nn.ReLU6(inplace=True),
            conv(in_channels, out_channels, 3, padding=1, bias=False),
            norm(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, *size) -> (B, C_out, *(size * ratio))."""
        return self.conv(self.up(x))


class LightDecoder(nn.Module):
    """SparK's light UNet decoder for a given pyramid.

    Args:
        feature_strides: the encoder's strides, finest -> coarsest (e.g. ``[4, 8, 16, 32]``); each an int
            or one int per spatial axis.
        decoder_width: width at the coarsest scale; it halves at every step.
        out_channels: the input's channel count.
        spatial_dims: 1 (signals), 2 (images, the default) or 3 (volumes, video).

    Attributes:
        steps: upsampling ratio of each step, coarsest first (an int, or per axis where axes differ).
        widths: map width at the coarsest scale and after each step.
        skip_widths: the width the densified feature of each encoder scale must have, coarsest first.
    """

    def __init__(
        self, feature_strides: Sequence[Stride], decoder_width: int, out_channels: int, spatial_dims: int = 2
    ) -> None:
        super().__init__()
        if int(decoder_width) != decoder_width or decoder_width < 1:
            raise SparsifyError(f"decoder_width must be a positive integer, got {decoder_width!r}")
        if int(out_channels) != out_channels or out_channels < 1:
            raise SparsifyError(f"the decoder needs a positive image channel count, got {out_channels!r}")
        rank = check_rank(spatial_dims)
        self.spatial_dims = rank
        self.feature_strides = [compact(s) for s in _check_strides(feature_strides, rank)]
        self.steps = decoder_steps(self.feature_strides, rank)
        self.widths = decoder_widths(int(decoder_width), len(self.steps))
        self.num_scales = len(self.feature_strides)
        self.skip_widths = self.widths[: self.num_scales]
        self.blocks = nn.ModuleList(
            UpBlock(self.widths[i], self.widths[i + 1], r, rank) for i, r in enumerate(self.steps)
        )
        self.proj = CONV[rank](self.widths[-1], int(out_channels), kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, _ConvNd):  # convolutions and transposed convolutions of every rank
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, _BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _add_skip(self, x: torch.Tensor, skip: torch.Tensor, i: int) -> torch.Tensor:
        if skip.shape[2:] != x.shape[2:]:
            raise SparsifyError(
                f"decoder scale {i} (stride {self.feature_strides[-1 - i]}) expected a "
                f"{tuple(x.shape[2:])} map but the encoder feature is {tuple(skip.shape[2:])}; "
                "the input size must be a multiple of the downsample ratio"
            )
        return x + skip

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decode densified features (coarsest first, widths ``skip_widths``) to a stride-1 map."""
        if len(features) != self.num_scales:
            raise SparsifyError(
                f"the decoder was built for {self.num_scales} scales but got {len(features)} feature maps"
            )
        x = features[0]
        for i, block in enumerate(self.blocks):
            if 0 < i < self.num_scales:
                x = self._add_skip(x, features[i], i)
            x = block(x)
        if 1 < self.num_scales == len(self.blocks) + 1:
            # the finest scale is at stride 1: no step leaves it, so it joins after the last step
            x = self._add_skip(x, features[-1], self.num_scales - 1)
        return self.proj(x)
