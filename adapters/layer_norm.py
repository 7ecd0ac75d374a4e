"""Masked LayerNorm over (C, H, W): statistics per sample over active sites only.

LayerNorm over channels alone (channels-last ``nn.LayerNorm``, timm's ``LayerNorm2d``, torchvision's
permute-LayerNorm-permute) is per site and needs no adapter: see ``pointwise.py``. This file covers
the rarer normalisation over space as well, dispatched from the LayerNorm rules.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ._kinds import statistic_rule
from ._registry import Decision, NodeView, Unsupported, register_rule
from ._stats import masked_moments
from .pointwise import _last_dim_rule

__all__ = ["masked_layer_norm_fn", "masked_layer_norm"]


def masked_layer_norm_fn(mask, input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Mask-aware ``F.layer_norm`` whose normalised dims include the spatial ones."""
    if mask is None:
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    k = len(normalized_shape)
    mean, var, _ = masked_moments(input, mask, tuple(range(input.dim() - k, input.dim())))
    y = (input.to(mean.dtype) - mean) * torch.rsqrt(var + eps)  # fp32 at least (fp64 stays fp64)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(input.dtype)


def masked_layer_norm(module: nn.LayerNorm, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return module(x)
    return masked_layer_norm_fn(mask, x, module.normalized_shape, module.weight, module.bias, module.eps)


def _dispatch(per_site, over_space, normalised_dims_of):
    def rule(view: NodeView) -> Decision:
        x = view.arg(0, "input")
        info = view.info(x)
        if info is not None and info.spatial is not None:
            ndim = len(view.shape(x))
            if max(info.spatial) >= ndim - normalised_dims_of(view):
                return over_space(view)
        return per_site(view)

    return rule


def _fn_normalised_dims(view: NodeView) -> int:
    shape = view.arg(1, "normalized_shape")
    if isinstance(shape, fx.Node):  # e.g. x.shape[1:]: only known at run time
        raise Unsupported("layer_norm with a normalized_shape computed at run time (e.g. x.shape[1:]); "
                          "pass a fixed tuple")
    return len(shape)


register_rule(nn.LayerNorm, _dispatch(
    _last_dim_rule(lambda v: v.module.bias, lambda v: len(v.module.normalized_shape), "LayerNorm"),
    statistic_rule(masked_layer_norm), lambda v: len(v.module.normalized_shape)))
register_rule(F.layer_norm, _dispatch(
    _last_dim_rule(lambda v: v.arg(3, "bias"), _fn_normalised_dims, "layer_norm"),
    statistic_rule(masked_layer_norm_fn), _fn_normalised_dims))
