"""Masked BatchNorm: statistics over active sites only; running estimates updated from them.

Covers nn.BatchNorm2d, nn.SyncBatchNorm (sums all-reduced across ranks), timm's BatchNormAct2d /
SyncBatchNormAct (its drop and activation are kept) and functional ``F.batch_norm`` on feature maps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ._kinds import statistic_rule
from ._registry import register_rule
from ._stats import masked_sums, moments_from_sums

__all__ = ["masked_batch_norm", "masked_batch_norm_fn"]


def _sync_sums(s1: torch.Tensor, s2: torch.Tensor, n: torch.Tensor, group=None):
    """All-reduce the masked sums across ranks, differentiably (SyncBatchNorm semantics)."""
    from torch.distributed.nn.functional import all_reduce

    c = s1.shape[1]
    packed = torch.cat([s1.flatten(), s2.flatten(), n.flatten()])
    packed = all_reduce(packed, group=group)
    shape = s1.shape
    return packed[:c].view(shape), packed[c:2 * c].view(shape), packed[2 * c:].view(n.shape)


def _normalise(x, mask, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps,
               num_batches_tracked=None, sync_group=None, synchronise=False):
    channel_dims = tuple(d for d in range(x.dim()) if d != 1)
    s1, s2, n = masked_sums(x, mask, channel_dims)
    if synchronise:
        s1, s2, n = _sync_sums(s1, s2, n, sync_group)
    mean, var = moments_from_sums(s1, s2, n)
    if running_mean is not None and use_batch_stats:
        with torch.no_grad():
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as nn.BatchNorm does
                factor = 1.0 / num_batches_tracked.to(torch.float32)
            else:
                factor = momentum
            has_data = n.flatten()[0] > 0  # the count is the same for every channel
            unbiased = var * (n / (n - 1).clamp_min(1.0))
            new_mean = torch.lerp(running_mean.float(), mean.flatten(), factor)
            new_var = torch.lerp(running_var.float(), unbiased.flatten(), factor)
            running_mean.copy_(torch.where(has_data, new_mean, running_mean.float()))
            running_var.copy_(torch.where(has_data, new_var, running_var.float()))
    rstd = torch.rsqrt(var + eps)
    scale = rstd if weight is None else rstd * weight.view_as(rstd).float()
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.view_as(shift).float()
    return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))


def masked_batch_norm(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mask-aware forward of a BatchNorm module (nn.BatchNorm*, SyncBatchNorm, timm BatchNormAct2d).

    In eval mode (running statistics) BatchNorm is a per-channel affine map and runs unchanged.
    """
    if mask is None:
        return module(x)
    use_batch_stats = module.training or module.running_mean is None
    if not use_batch_stats:
        return module(x)
    synchronise = (
        isinstance(module, nn.SyncBatchNorm) or type(module).__name__ == "SyncBatchNormAct"
    ) and dist.is_available() and dist.is_initialized() and dist.get_world_size(module.process_group) > 1
    y = _normalise(
        x, mask, module.running_mean if module.track_running_stats else None,
        module.running_var if module.track_running_stats else None,
        module.weight if module.affine else None, module.bias if module.affine else None,
        use_batch_stats=module.training, momentum=module.momentum, eps=module.eps,
        num_batches_tracked=module.num_batches_tracked if module.track_running_stats else None,
        sync_group=getattr(module, "process_group", None), synchronise=synchronise,
    )
    # timm's norm+act layers carry their dropout and activation as submodules.
    drop = getattr(module, "drop", None)
    act = getattr(module, "act", None)
    if drop is not None:
        y = drop(y)
    if act is not None:
        y = act(y)
    return y


def masked_batch_norm_fn(mask, input, running_mean=None, running_var=None, weight=None, bias=None,
                         training=False, momentum=0.1, eps=1e-5):
    """Mask-aware ``F.batch_norm`` on a feature map (channel dim 1)."""
    if mask is None or not (training or running_mean is None):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _normalise(input, mask, running_mean, running_var, weight, bias, use_batch_stats=training,
                      momentum=momentum, eps=eps)


for _cls in (nn.BatchNorm2d, nn.SyncBatchNorm, nn.LazyBatchNorm2d):
    register_rule(_cls, statistic_rule(masked_batch_norm))
register_rule(F.batch_norm, statistic_rule(masked_batch_norm_fn))


def _register_timm() -> None:
    try:
        from timm.layers import norm_act
    except ImportError:  # timm is optional for the core
        return
    from ._kinds import module_is_nonneg

    for name in ("BatchNormAct2d", "SyncBatchNormAct"):
        cls = getattr(norm_act, name, None)
        if cls is not None:
            register_rule(cls, statistic_rule(
                masked_batch_norm, nonneg=lambda v: module_is_nonneg(getattr(v.module, "act", None))))


_register_timm()
