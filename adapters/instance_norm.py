"""Masked InstanceNorm (1-D, 2-D, 3-D): per-sample, per-channel statistics over active sites only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._kinds import statistic_rule, zero_output
from ._registry import register_rule
from ._stats import apply_mask, masked_moments

__all__ = ["masked_instance_norm", "masked_instance_norm_fn"]


def masked_instance_norm_fn(mask, input, running_mean=None, running_var=None, weight=None, bias=None,
                            use_input_stats=True, momentum=0.1, eps=1e-5):
    """Mask-aware ``F.instance_norm``."""
    if mask is None or not use_input_stats:
        return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats,
                               momentum, eps)
    mean, var, n = masked_moments(input, mask, tuple(range(2, input.dim())))  # (B, C, 1, 1)
    if running_mean is not None:
        with torch.no_grad():
            unbiased = var * (n / (n - 1).clamp_min(1.0))
            running_mean.lerp_(mean.mean(0).flatten().to(running_mean.dtype), momentum)
            running_var.lerp_(unbiased.mean(0).flatten().to(running_var.dtype), momentum)
    scale = torch.rsqrt(var + eps)
    shape = (1, input.shape[1]) + (1,) * (input.dim() - 2)
    if weight is not None:
        scale = scale * weight.view(shape).to(scale.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.view(shape).to(shift.dtype)
    return torch.addcmul(shift.to(input.dtype), input, scale.to(input.dtype))


def masked_instance_norm(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return module(x)
    use_input_stats = module.training or not module.track_running_stats
    return masked_instance_norm_fn(
        mask, x, module.running_mean if module.track_running_stats else None,
        module.running_var if module.track_running_stats else None,
        module.weight, module.bias, use_input_stats,
        module.momentum if module.momentum is not None else 0.0, module.eps)  # as nn.InstanceNorm does


def _zeroed_module(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """What the rewrite calls: :func:`masked_instance_norm`, exactly zero at masked sites.

    Zeroing where the output is written spares the mask multiply the next convolution would need, and
    with it a second saved copy of the map (the activation keeps its output, the convolution its
    masked input): the saved memory stays what dense InstanceNorm saves.
    """
    y = masked_instance_norm(module, x, mask)
    # in place where y is the masked path's own addcmul result; F.instance_norm's output otherwise
    return apply_mask(y, mask, in_place=module.training or not module.track_running_stats)


def _zeroed_fn(mask, input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
               momentum=0.1, eps=1e-5):
    """What the rewrite calls for ``F.instance_norm``: :func:`masked_instance_norm_fn`, zero at masked sites."""
    y = masked_instance_norm_fn(mask, input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    return apply_mask(y, mask, in_place=use_input_stats)


for _cls in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LazyInstanceNorm1d,
             nn.LazyInstanceNorm2d, nn.LazyInstanceNorm3d):
    register_rule(_cls, zero_output(statistic_rule(_zeroed_module)))
register_rule(F.instance_norm, zero_output(statistic_rule(_zeroed_fn)))
