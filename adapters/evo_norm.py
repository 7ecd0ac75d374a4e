"""Masked EvoNorm-B0 (timm ``EvoNorm2dB0``): batch variance and instance std over active sites.

EvoNorm-S variants (group std written with ``reshape`` + ``var``) trace through and are covered by
the masked reductions in ``reduce`` and ``_flat``. B0 branches on ``self.training`` in Python (batch
variance and a running-variance update in training, the running variance in eval), so it is kept
whole and replaced here: the batch variance is over the active sites of the whole batch, the
running estimate uses the unbiased factor n / (n - 1) of the *active* count n (timm's dense forward
uses every site), and a batch without two active sites leaves the running variance as it was.
"""

from __future__ import annotations

import torch
from torch import nn

from ._kinds import statistic_rule
from ._registry import register_rule
from ._stats import masked_moments
from .reduce import masked_var

__all__ = ["masked_evo_norm_b0"]


def masked_evo_norm_b0(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mask-aware forward of timm's ``EvoNorm2dB0`` on a (B, C, H, W) map."""
    if mask is None:
        return module(x)
    x_dtype = x.dtype
    v_shape = (1, -1, 1, 1)
    if module.v is not None:
        if module.training:
            _, var, n = masked_moments(x.float(), mask, (0, 2, 3))
            var = var.reshape(-1)
            n = n.reshape(())
            with torch.no_grad():
                unbiased = var.detach().to(module.running_var.dtype) * (n / (n - 1).clamp_min(1.0))
                updated = module.running_var * (1 - module.momentum) + unbiased * module.momentum
                module.running_var.copy_(torch.where(n > 1, updated, module.running_var))
        else:
            var = module.running_var
        left = var.add(module.eps).sqrt().to(x_dtype).view(v_shape).expand_as(x)
        v = module.v.to(x_dtype).view(v_shape)
        std = masked_var(mask, x.float(), (2, 3), correction=0, keepdim=True)
        right = x * v + std.add(module.eps).sqrt().to(x_dtype).expand_as(x)
        x = x / left.max(right)
    return x * module.weight.to(x_dtype).view(v_shape) + module.bias.to(x_dtype).view(v_shape)


def _register_timm() -> None:
    try:
        from timm.layers.evo_norm import EvoNorm2dB0
    except ImportError:  # timm is optional for the core
        return
    register_rule(EvoNorm2dB0, statistic_rule(masked_evo_norm_b0))


_register_timm()
