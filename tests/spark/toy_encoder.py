"""A tiny stand-in sparse encoder with the attributes of ``sparsify.wrap``'s result, for 1-, 2- and 3-D
inputs (tests only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsify._geometry import compact, per_axis
from sparsify.spark._patches import mask_at

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class ToyEncoder(nn.Module):
    """Stride-r convs between scales plus one 3x3 (3x3x3, 3) conv per scale; masked sites are kept at zero.

    ``strides`` are per scale, each an int or one int per axis; ``patch_size`` (default: the coarsest
    stride) may be finer than the downsample ratio, in which case a cell of a coarser stage is active
    when any of its patches is visible.
    """

    def __init__(
        self,
        in_chans: int = 3,
        channels: Sequence[int] = (8, 16, 32, 64),
        strides: Sequence[int | Sequence[int]] = (4, 8, 16, 32),
        norm_type: str | None = None,
        spatial_dims: int = 2,
        patch_size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        per_axis_strides = [per_axis(s, spatial_dims) for s in strides]
        self.spatial_dims = spatial_dims
        self.in_chans = in_chans
        self.feature_channels = list(channels)
        self.feature_strides = [compact(s) for s in per_axis_strides]
        self.downsample_ratio = self.feature_strides[-1]
        self.patch_size = self.downsample_ratio if patch_size is None else patch_size
        self.norm_type = norm_type
        conv = _CONV[spatial_dims]
        downs, mixes = [], []
        prev_c, prev_s = in_chans, (1,) * spatial_dims
        for c, s in zip(channels, per_axis_strides):
            r = compact(tuple(a // b for a, b in zip(s, prev_s)))
            downs.append(conv(prev_c, c, kernel_size=r, stride=r))
            mixes.append(conv(c, c, kernel_size=3, padding=1))
            prev_c, prev_s = c, s
        self.downs = nn.ModuleList(downs)
        self.mixes = nn.ModuleList(mixes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        def keep(t: torch.Tensor) -> torch.Tensor:
            return t if mask is None else t * mask_at(mask, t.shape[2:]).to(t.dtype)

        x = keep(x)
        feats = []
        for down, mix in zip(self.downs, self.mixes):
            x = keep(F.gelu(down(x)))
            x = keep(x + F.gelu(mix(x)))
            feats.append(x)
        return feats

    def dense_encoder(self) -> nn.Module:
        return _Dense(self)


class _Dense(nn.Module):
    def __init__(self, enc: ToyEncoder) -> None:
        super().__init__()
        self.enc = enc

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.enc(x, None)
