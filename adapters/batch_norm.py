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


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    t = t.contiguous()
    dist.all_reduce(t, group=group)
    return t


class _MaskedBatchNorm(torch.autograd.Function):
    """BatchNorm with statistics over active sites, in few passes over memory.

    Forward: the masked sums (one multiply, two fp32 reductions), then the native BatchNorm kernel with
    those statistics. Backward: the native kernel's per-site part plus one fused correction for the
    statistics' dependence on the active inputs. Values at masked sites carry no gradient: the
    rewrite guarantees they never reach an active output.
    """

    @staticmethod
    def forward(ctx, x, mask, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                group, synchronise):
        dims = tuple(d for d in range(x.dim()) if d != 1)
        s1, s2, n = masked_sums(x, mask, dims)
        if synchronise:
            c = s1.shape[1]
            packed = _all_reduce(torch.cat([s1.flatten(), s2.flatten(), n.flatten()[:1]]), group)
            s1, s2, n = packed[:c].view_as(s1), packed[c:2 * c].view_as(s2), packed[2 * c:].view(1, 1, 1, 1)
        acc = torch.promote_types(x.dtype, torch.float32)
        mean, var = moments_from_sums(s1, s2, n, acc)
        mean, var, n = mean.flatten(), var.flatten(), n.to(acc)
        if running_mean is not None:
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            factor = 1.0 / num_batches_tracked.to(torch.float32) if momentum is None else momentum
            has_data = n.flatten()[0] > 0  # the count is the same for every channel
            unbiased = var * (n.flatten()[0] / (n.flatten()[0] - 1).clamp_min(1.0))
            old_mean, old_var = running_mean.to(mean.dtype), running_var.to(var.dtype)
            new_mean = torch.lerp(old_mean, mean, factor)
            new_var = torch.lerp(old_var, unbiased, factor)
            running_mean.copy_(torch.where(has_data, new_mean, old_mean))
            running_var.copy_(torch.where(has_data, new_var, old_var))
        param_dtype = weight.dtype if weight is not None else acc
        mean_p, var_p = mean.to(param_dtype), var.to(param_dtype)
        y = F.batch_norm(x, mean_p, var_p, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, mask, weight, mean_p, var_p, n)
        ctx.eps, ctx.group, ctx.synchronise = eps, group, synchronise
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, mask, weight, mean, var, n = ctx.saved_tensors
        w = weight if weight is not None else torch.ones_like(mean)
        grad_x, sum_g_xhat, sum_g = torch.ops.aten.native_batch_norm_backward(
            grad.contiguous(memory_format=_memory_format(x)), x, w, mean, var, None, None, False, ctx.eps,
            [True, True, True])
        grad_w = sum_g_xhat if weight is not None and ctx.needs_input_grad[2] else None
        grad_b = sum_g if ctx.has_bias and ctx.needs_input_grad[3] else None
        if ctx.synchronise:
            packed = _all_reduce(torch.cat([sum_g, sum_g_xhat]), ctx.group)
            sum_g, sum_g_xhat = packed.chunk(2)
        # d/dx of the statistics: -m * w * rstd / n * (sum g + xhat * sum g*xhat), as alpha + beta * x
        acc = torch.promote_types(var.dtype, torch.float32)
        rstd = torch.rsqrt(var.to(acc) + ctx.eps)
        k = w.to(acc) * rstd / n.flatten()[0].clamp_min(1.0)
        beta = -k * rstd * sum_g_xhat.to(acc)
        alpha = -k * sum_g.to(acc) - beta * mean.to(acc)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        correction = torch.addcmul(alpha.view(shape).to(x.dtype), x, beta.view(shape).to(x.dtype))
        grad_x = grad_x.addcmul_(correction, mask.to(x.dtype))
        return grad_x, None, grad_w, grad_b, None, None, None, None, None, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _normalise(x, mask, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps,
               num_batches_tracked=None, sync_group=None, synchronise=False):
    update = running_mean is not None and use_batch_stats
    return _MaskedBatchNorm.apply(
        x, mask.to(x.dtype), weight, bias, running_mean if update else None, running_var if update else None,
        num_batches_tracked if update else None, momentum, eps, sync_group, synchronise)


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
