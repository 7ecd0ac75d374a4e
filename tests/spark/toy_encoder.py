"""A tiny stand-in sparse encoder with the attributes of ``sparsify.wrap``'s result (tests only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsify.spark._patches import repeat_mask


class ToyEncoder(nn.Module):
    """Stride-r convs between scales plus one 3x3 conv per scale; masked sites are kept at zero."""

    def __init__(
        self,
        in_chans: int = 3,
        channels: Sequence[int] = (8, 16, 32, 64),
        strides: Sequence[int] = (4, 8, 16, 32),
        norm_type: str | None = None,
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.feature_channels = list(channels)
        self.feature_strides = list(strides)
        self.downsample_ratio = self.feature_strides[-1]
        self.norm_type = norm_type
        downs, mixes = [], []
        prev_c, prev_s = in_chans, 1
        for c, s in zip(channels, strides):
            r = s // prev_s
            downs.append(nn.Conv2d(prev_c, c, kernel_size=r, stride=r))
            mixes.append(nn.Conv2d(c, c, kernel_size=3, padding=1))
            prev_c, prev_s = c, s
        self.downs = nn.ModuleList(downs)
        self.mixes = nn.ModuleList(mixes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        def keep(t: torch.Tensor) -> torch.Tensor:
            return t if mask is None else t * repeat_mask(mask, t.shape[-2:]).to(t.dtype)

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
