"""The light UNet decoder of SparK, generated from an encoder's feature pyramid.

The plan is derived from the encoder's feature strides (finest -> coarsest), for example
``[4, 8, 16, 32]``. Decoding starts at the coarsest scale and walks to stride 1:

* one upsampling step per pair of neighbouring encoder scales, by that pair's integer stride ratio
  (32 -> 16 is a x2 step, 12 -> 4 a x3 step, ...); the densified encoder feature of every scale is
  *added* to the decoder's running map before the step that leaves that scale;
* after the finest encoder scale, extra steps bring the map back to stride 1. The finest stride is
  split into its prime factors, largest first (4 -> x2, x2; 6 -> x3, x2; 7 -> x7), so a ResNet or
  ConvNeXt pyramid gets the paper's decoder exactly: five x2 steps from stride 32;
* every step is a transposed conv (kernel 2r, stride r; padding r/2 for even r, and for odd r padding
  (r+1)/2 with one row/column of output padding, so the output is exactly r times the input), then
  conv3x3 - BN - ReLU6 - conv3x3 - BN;
* widths start at ``decoder_width`` at the coarsest scale and halve at every step (never below 1);
* a final 1x1 conv maps to the image's channel count. There is no output activation: the decoder
  predicts per-patch normalised pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..errors import SparsifyError

__all__ = ["decoder_steps", "decoder_widths", "upsampler", "UpBlock", "LightDecoder"]


def _check_strides(strides: Sequence[int]) -> list[int]:
    if len(strides) == 0:
        raise SparsifyError("the encoder reports no feature scales; SparK needs at least one")
    out: list[int] = []
    for s in strides:
        if int(s) != s or int(s) < 1:
            raise SparsifyError(f"feature strides must be positive integers, got {list(strides)}")
        out.append(int(s))
    for fine, coarse in zip(out[:-1], out[1:]):
        if coarse <= fine or coarse % fine:
            raise SparsifyError(
                f"feature strides {out} must increase from finest to coarsest and each must be an integer "
                f"multiple of the previous one ({coarse} / {fine} is not an integer > 1); pick other stage "
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


def decoder_steps(feature_strides: Sequence[int]) -> list[int]:
    """Upsampling ratio of every decoder step, coarsest first, for strides given finest -> coarsest.

    >>> decoder_steps([4, 8, 16, 32])
    [2, 2, 2, 2, 2]
    >>> decoder_steps([7])
    [7]
    """
    strides = _check_strides(feature_strides)
    between = [c // f for f, c in zip(strides[:-1], strides[1:])][::-1]
    extra = sorted(_prime_factors(strides[0]), reverse=True)
    return between + extra


def decoder_widths(decoder_width: int, num_steps: int) -> list[int]:
    """Widths of the decoder's maps: at the coarsest scale, then after each of ``num_steps`` steps."""
    return [max(1, decoder_width >> i) for i in range(num_steps + 1)]


def upsampler(channels: int, ratio: int) -> nn.ConvTranspose2d:
    """Transposed conv (kernel 2r, stride r) whose output is exactly ``ratio`` times its input size."""
    if ratio < 2:
        raise SparsifyError(f"an upsampling step needs an integer ratio >= 2, got {ratio}")
    padding = (ratio + 1) // 2
    output_padding = 2 * padding - ratio  # 0 for even ratios, 1 for odd ones
    return nn.ConvTranspose2d(
        channels,
        channels,
        kernel_size=2 * ratio,
        stride=ratio,
        padding=padding,
        output_padding=output_padding,
    )


class UpBlock(nn.Module):
    """One decoder step: upsample by ``ratio``, then conv3x3 - BN - ReLU6 - conv3x3 - BN."""

    def __init__(self, in_channels: int, out_channels: int, ratio: int) -> None:
        super().__init__()
        self.ratio = ratio
        self.up = upsampler(in_channels, ratio)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU6(inplace=True),
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, h, w) -> (B, C_out, h * ratio, w * ratio)."""
        return self.conv(self.up(x))


class LightDecoder(nn.Module):
    """SparK's light UNet decoder for a given pyramid.

    Args:
        feature_strides: the encoder's strides, finest -> coarsest (e.g. ``[4, 8, 16, 32]``).
        decoder_width: width at the coarsest scale; it halves at every step.
        out_channels: the image's channel count.

    Attributes:
        steps: upsampling ratio of each step, coarsest first.
        widths: map width at the coarsest scale and after each step.
        skip_widths: the width the densified feature of each encoder scale must have, coarsest first.
    """

    def __init__(self, feature_strides: Sequence[int], decoder_width: int, out_channels: int) -> None:
        super().__init__()
        if int(decoder_width) != decoder_width or decoder_width < 1:
            raise SparsifyError(f"decoder_width must be a positive integer, got {decoder_width!r}")
        if int(out_channels) != out_channels or out_channels < 1:
            raise SparsifyError(f"the decoder needs a positive image channel count, got {out_channels!r}")
        self.feature_strides = _check_strides(feature_strides)
        self.steps = decoder_steps(self.feature_strides)
        self.widths = decoder_widths(int(decoder_width), len(self.steps))
        self.num_scales = len(self.feature_strides)
        self.skip_widths = self.widths[: self.num_scales]
        self.blocks = nn.ModuleList(
            UpBlock(self.widths[i], self.widths[i + 1], r) for i, r in enumerate(self.steps)
        )
        self.proj = nn.Conv2d(self.widths[-1], int(out_channels), kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decode densified features (coarsest first, widths ``skip_widths``) to a stride-1 image map."""
        if len(features) != self.num_scales:
            raise SparsifyError(
                f"the decoder was built for {self.num_scales} scales but got {len(features)} feature maps"
            )
        x = features[0]
        for i, block in enumerate(self.blocks):
            if 0 < i < self.num_scales:
                skip = features[i]
                if skip.shape[-2:] != x.shape[-2:]:
                    raise SparsifyError(
                        f"decoder scale {i} (stride {self.feature_strides[-1 - i]}) expected a "
                        f"{tuple(x.shape[-2:])} map but the encoder feature is {tuple(skip.shape[-2:])}; "
                        "the input size must be a multiple of the downsample ratio"
                    )
                x = x + skip
            x = block(x)
        return self.proj(x)
