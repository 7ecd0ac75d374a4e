"""Densify: turn one sparse encoder feature map into a dense decoder input.

SparK's encoder leaves every masked site of its features exactly zero ("absent"). Before the decoder
can use a scale, that scale is *densified*:

1. a normalisation computed over the active (visible) sites only,
2. a learned mask token, one (1, C, 1, 1) parameter per scale ((1, C, 1) for signals, (1, C, 1, 1, 1)
   for volumes), written into every masked site,
3. a projection to the decoder's width at that scale: 1x1 conv at the coarsest scale (identity there
   when the encoder width already equals the decoder width), 3x3 conv at every finer scale, even when
   the widths match (as the official SparK does: the 3x3 also mixes neighbouring sites). Volumes use
   the 3-D versions of each (3x3x3), signals the 1-D ones.

All statistics use the mask as a 0/1 weight, so nothing here synchronises with the host or has a
data-dependent shape; it runs under autocast and ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import SparsifyError
from ._patches import mask_at
from ._rank import CONV, check_rank

__all__ = [
    "DENSIFY_NORMS",
    "MASKED_BATCH_NORMS",
    "MaskedBatchNorm1d",
    "MaskedBatchNorm2d",
    "MaskedBatchNorm3d",
    "ChannelLayerNorm",
    "ChannelLayerNorm2d",
    "Densify",
    "resolve_densify_norm",
]

#: Accepted values of ``densify_norm`` (besides ``"auto"``).
DENSIFY_NORMS = ("batch", "layer", "none")


def resolve_densify_norm(densify_norm: str | None, encoder_norm_type: str | None) -> str:
    """Resolve ``densify_norm`` to one of :data:`DENSIFY_NORMS`.

    ``"auto"`` picks ``"batch"`` for encoders dominated by BatchNorm and ``"layer"`` (LayerNorm over
    channels) for everything else (LayerNorm, GroupNorm or normalisation-free networks), like SparK.
    ``None`` means ``"none"``.
    """
    if densify_norm is None:
        return "none"
    if not isinstance(densify_norm, str):
        raise SparsifyError(f"densify_norm must be a string, got {type(densify_norm).__name__}")
    choice = densify_norm.lower()
    if choice == "auto":
        return "batch" if encoder_norm_type == "batch" else "layer"
    if choice not in DENSIFY_NORMS:
        raise SparsifyError(
            f"densify_norm={densify_norm!r} is not supported; "
            "use 'auto' (default), 'batch', 'layer' or 'none'"
        )
    return choice


class _MaskedBatchNorm(_BatchNorm):
    """BatchNorm whose batch statistics count active sites only, for any spatial rank.

    In training mode the mean and (biased) variance are 0/1-weighted sums over the active sites of the
    whole batch, computed in (at least) fp32; the running estimates are updated with the unbiased
    variance, as ``nn.BatchNorm2d`` does. In eval mode the running estimates are used. Masked sites of
    the output are left unspecified (the caller overwrites them). Parameters and buffers have the
    torch BatchNorm's names.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Normalise ``x`` (B, C, *size) using the active sites of ``mask`` (B, 1, *size, bool or 0/1)."""
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # at least fp32 statistics
        dims = (0, *range(2, x.dim()))
        per_channel = (1, -1) + (1,) * (x.dim() - 2)
        if self.training or not self.track_running_stats:
            w = mask.to(xf.dtype)
            count = w.sum()
            n = count.clamp(min=1.0)
            mean = (xf * w).sum(dim=dims) / n
            centred = (xf - mean.view(per_channel)) * w
            var = centred.square().sum(dim=dims) / n
            if self.training and self.track_running_stats:
                self._update_running_stats(mean, var, count)
        else:
            mean = self.running_mean.to(xf.dtype)
            var = self.running_var.to(xf.dtype)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale = scale * self.weight.to(xf.dtype)
            shift = shift * self.weight.to(xf.dtype) + self.bias.to(xf.dtype)
        y = xf * scale.view(per_channel) + shift.view(per_channel)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        unbiased = var * (count / (count - 1.0).clamp(min=1.0))
        rm, rv = self.running_mean, self.running_var
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
            weight = (1.0 / self.num_batches_tracked).to(rm.dtype)
            rm.lerp_(mean.to(rm.dtype), weight)
            rv.lerp_(unbiased.to(rv.dtype), weight)
        else:
            rm.lerp_(mean.to(rm.dtype), float(self.momentum))
            rv.lerp_(unbiased.to(rv.dtype), float(self.momentum))


class MaskedBatchNorm1d(_MaskedBatchNorm, nn.BatchNorm1d):
    """Masked BatchNorm (:class:`MaskedBatchNorm2d`'s rule) for (B, C, L) signal features."""


class MaskedBatchNorm2d(_MaskedBatchNorm, nn.BatchNorm2d):
    """BatchNorm2d whose batch statistics count active sites only.

    In training mode the mean and (biased) variance are 0/1-weighted sums over the active sites of the
    whole batch, computed in (at least) fp32; the running estimates are updated with the unbiased variance, as
    ``nn.BatchNorm2d`` does. In eval mode the running estimates are used. Masked sites of the output
    are left unspecified (the caller overwrites them). Parameters and buffers have BatchNorm2d's names.
    """


class MaskedBatchNorm3d(_MaskedBatchNorm, nn.BatchNorm3d):
    """Masked BatchNorm (:class:`MaskedBatchNorm2d`'s rule) for (B, C, D, H, W) volume features."""


#: The masked BatchNorm of each spatial rank.
MASKED_BATCH_NORMS: dict[int, type[_MaskedBatchNorm]] = {
    1: MaskedBatchNorm1d,
    2: MaskedBatchNorm2d,
    3: MaskedBatchNorm3d,
}


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each site of a (B, C, *size) map, for any spatial rank.

    It has no statistics across space, so it needs no mask: every active site is normalised on its own.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """Normalise over channels; ``mask`` is accepted for a uniform interface and ignored."""
        y = F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


class ChannelLayerNorm2d(ChannelLayerNorm):
    """LayerNorm over the channels of each site of a (B, C, H, W) map (the 2-D densify's class)."""


class _NoNorm(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x


class Densify(nn.Module):
    """Densify one scale: masked normalisation, mask token at masked sites, projection.

    Args:
        in_channels: the encoder's channel count at this scale.
        out_channels: the decoder's width at this scale.
        norm: ``"batch"`` (masked BatchNorm), ``"layer"`` (LayerNorm over channels) or ``"none"``.
        coarsest: whether this is the coarsest scale (1x1 projection, identity if the widths match) or a
            finer one (always a 3x3 projection).
        spatial_dims: 1 (signals: BatchNorm1d, Conv1d), 2 (images) or 3 (volumes: BatchNorm3d, Conv3d,
            a 3x3x3 projection); the mask token is (1, C) followed by one 1 per spatial axis.
    """

    def __init__(
        self, in_channels: int, out_channels: int, norm: str, coarsest: bool, spatial_dims: int = 2
    ) -> None:
        super().__init__()
        rank = check_rank(spatial_dims)
        if norm == "batch":
            self.norm: nn.Module = MASKED_BATCH_NORMS[rank](in_channels)
        elif norm == "layer":
            self.norm = ChannelLayerNorm2d(in_channels) if rank == 2 else ChannelLayerNorm(in_channels)
        elif norm == "none":
            self.norm = _NoNorm()
        else:
            raise SparsifyError(f"unknown densify norm {norm!r}; use 'batch', 'layer' or 'none'")
        self.mask_token = nn.Parameter(torch.zeros(1, in_channels, *(1,) * rank))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.04, b=0.04)
        if coarsest and in_channels == out_channels:
            self.proj: nn.Module = nn.Identity()
        else:
            k = 1 if coarsest else 3
            self.proj = CONV[rank](in_channels, out_channels, kernel_size=k, padding=k // 2, bias=True)

    def forward(self, feature: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Densify ``feature`` (B, C, *size); ``mask`` is the bool (B, 1, *grid) patch mask, True = visible.

        The mask is brought to the feature's resolution here (:func:`~._patches.mask_at`: repeated where
        the feature is finer, "any patch visible" where it is coarser).
        """
        mask = mask_at(mask, feature.shape[2:])
        if mask.dtype != torch.bool:
            mask = mask > 0.5
        y = self.norm(feature, mask)
        token = self.mask_token.to(y.dtype)
        y = torch.where(mask, y, token)
        return self.proj(y)
