"""Densify: turn one sparse encoder feature map into a dense decoder input.

SparK's encoder leaves every masked site of its features exactly zero ("absent"). Before the decoder
can use a scale, that scale is *densified*:

1. a normalisation computed over the active (visible) sites only,
2. a learned mask token, one (1, C, 1, 1) parameter per scale, written into every masked site,
3. a projection to the decoder's width at that scale: 1x1 conv at the coarsest scale (identity there
   when the encoder width already equals the decoder width), 3x3 conv at every finer scale, even when
   the widths match (as the official SparK does: the 3x3 also mixes neighbouring sites).

All statistics use the mask as a 0/1 weight, so nothing here synchronises with the host or has a
data-dependent shape; it runs under autocast and ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SparsifyError
from ._patches import repeat_mask

__all__ = ["DENSIFY_NORMS", "MaskedBatchNorm2d", "ChannelLayerNorm2d", "Densify", "resolve_densify_norm"]

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


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose batch statistics count active sites only.

    In training mode the mean and (biased) variance are 0/1-weighted sums over the active sites of the
    whole batch, computed in (at least) fp32; the running estimates are updated with the unbiased variance, as
    ``nn.BatchNorm2d`` does. In eval mode the running estimates are used. Masked sites of the output
    are left unspecified (the caller overwrites them). Parameters and buffers have BatchNorm2d's names.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Normalise ``x`` (B, C, H, W) using the active sites of ``mask`` (B, 1, H, W, bool or 0/1)."""
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # at least fp32 statistics
        if self.training or not self.track_running_stats:
            w = mask.to(xf.dtype)
            count = w.sum()
            n = count.clamp(min=1.0)
            mean = (xf * w).sum(dim=(0, 2, 3)) / n
            centred = (xf - mean.view(1, -1, 1, 1)) * w
            var = centred.square().sum(dim=(0, 2, 3)) / n
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
        y = xf * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
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


class ChannelLayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each site of a (B, C, H, W) map.

    It has no statistics across space, so it needs no mask: every active site is normalised on its own.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """Normalise over channels; ``mask`` is accepted for a uniform interface and ignored."""
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


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
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str, coarsest: bool) -> None:
        super().__init__()
        if norm == "batch":
            self.norm: nn.Module = MaskedBatchNorm2d(in_channels)
        elif norm == "layer":
            self.norm = ChannelLayerNorm2d(in_channels)
        elif norm == "none":
            self.norm = _NoNorm()
        else:
            raise SparsifyError(f"unknown densify norm {norm!r}; use 'batch', 'layer' or 'none'")
        self.mask_token = nn.Parameter(torch.zeros(1, in_channels, 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.04, b=0.04)
        if coarsest and in_channels == out_channels:
            self.proj: nn.Module = nn.Identity()
        else:
            k = 1 if coarsest else 3
            self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=k, padding=k // 2, bias=True)

    def forward(self, feature: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Densify ``feature`` (B, C, h, w); ``mask`` is the bool (B, 1, h', w') patch mask, True = visible.

        The mask is repeated to the feature's resolution here when it is coarser.
        """
        mask = repeat_mask(mask, feature.shape[-2:])
        if mask.dtype != torch.bool:
            mask = mask > 0.5
        y = self.norm(feature, mask)
        token = self.mask_token.to(y.dtype)
        y = torch.where(mask, y, token)
        return self.proj(y)
