"""Masked GroupNorm: per-sample, per-group statistics over active sites only.

Covers nn.GroupNorm and ``F.group_norm`` (timm's GroupNorm / GroupNormAct trace through to it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._kinds import statistic_rule, zero_output
from ._registry import register_rule
from ._stats import apply_mask, masked_moments

__all__ = ["masked_group_norm", "masked_group_norm_fn"]


def masked_group_norm_fn(mask, input, num_groups, weight=None, bias=None, eps=1e-5):
    """Mask-aware ``F.group_norm`` for (B, C, *spatial) feature maps."""
    if mask is None:
        return F.group_norm(input, num_groups, weight, bias, eps)
    b, c = input.shape[:2]
    grouped = input.unflatten(1, (num_groups, c // num_groups))
    mean, var, _ = masked_moments(grouped, mask.unsqueeze(1), tuple(range(2, grouped.dim())))
    rstd = torch.rsqrt(var + eps)  # (B, G, 1, 1, 1)
    per_channel = (b, c) + (1,) * (input.dim() - 2)
    scale = rstd.expand(b, num_groups, c // num_groups, *rstd.shape[3:]).reshape(per_channel)
    mean_c = mean.expand(b, num_groups, c // num_groups, *mean.shape[3:]).reshape(per_channel)
    if weight is not None:
        scale = scale * weight.view(1, c, *([1] * (input.dim() - 2))).to(scale.dtype)
    shift = -mean_c * scale
    if bias is not None:
        shift = shift + bias.view(1, c, *([1] * (input.dim() - 2))).to(shift.dtype)
    return torch.addcmul(shift.to(input.dtype), input, scale.to(input.dtype))


def masked_group_norm(module: nn.GroupNorm, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return module(x)
    return masked_group_norm_fn(mask, x, module.num_groups, module.weight, module.bias, module.eps)


def _zeroed_fn(mask, input, num_groups, weight=None, bias=None, eps=1e-5):
    """What the rewrite calls: :func:`masked_group_norm_fn`, exactly zero at masked sites.

    The mask multiplies the normalisation's own output in place (nothing saved it), so the next
    convolution needs no masked copy of the map: the saved memory stays what dense GroupNorm saves.
    """
    return apply_mask(masked_group_norm_fn(mask, input, num_groups, weight, bias, eps), mask, in_place=True)


def _zeroed_module(module: nn.GroupNorm, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """What the rewrite calls for an ``nn.GroupNorm``: :func:`masked_group_norm`, zero at masked sites."""
    if mask is None:
        return module(x)
    return _zeroed_fn(mask, x, module.num_groups, module.weight, module.bias, module.eps)


#: Every function the rewrite may call for a GroupNorm (how ``SparseEncoder.norm_type`` recognises one).
GROUP_NORM_FUNCTIONS = (masked_group_norm, masked_group_norm_fn, _zeroed_module, _zeroed_fn)

register_rule(nn.GroupNorm, zero_output(statistic_rule(_zeroed_module)))
register_rule(F.group_norm, zero_output(statistic_rule(_zeroed_fn)))
