"""Masked BatchNorm: statistics over active sites only; running estimates updated from them.

Covers nn.BatchNorm1d/2d/3d over feature maps of any spatial rank, nn.SyncBatchNorm (sums all-reduced
across ranks), timm's BatchNormAct2d /
SyncBatchNormAct (its drop and activation are kept) and functional ``F.batch_norm`` on feature maps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ._kinds import module_preserves_zero, statistic_rule, zero_output
from ._registry import Decision, Info, NodeView, Unsupported, register_rule
from ._stats import apply_mask, first_active, mask_count

__all__ = ["masked_batch_norm", "masked_batch_norm_fn", "BATCH_NORM_FUNCTIONS"]


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    t = t.contiguous()
    dist.all_reduce(t, group=group)
    return t


class _MaskedBatchNorm(torch.autograd.Function):
    """BatchNorm with statistics over active sites, in few passes over memory; output zero at masked sites.

    Forward: one pass makes ``xs = (x - shift) * mask`` (shift: x at the first active site, see
    ``_stats``), one pass sums it and its square (fp32 accumulation is exact enough on shifted data),
    then the native kernel normalises ``xs`` with those statistics and one in-place multiply zeroes the
    masked sites. ``xs`` replaces ``x`` for backward, so the saved memory is what dense BatchNorm saves.
    Backward: the gradient is masked once, the native kernel sums it (for weight and bias), and three
    in-place passes give ``grad_x = a * g + beta * xs + alpha * mask`` (per-channel a, alpha, beta).
    """

    @staticmethod
    def forward(ctx, x, mask, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                group, synchronise):
        dims = tuple(d for d in range(x.dim()) if d != 1)
        fmt = _memory_format(x)
        shift = first_active(x, mask, dims)
        xs = (x - shift).mul_(mask)
        s1, s2 = _centred_sums(xs, dims)
        acc = torch.float32 if x.device.type == "mps" else torch.float64  # per-channel math only
        n = mask_count(x, mask, dims, acc).flatten()[:1]
        s1, s2, k = s1.to(acc), s2.to(acc), shift.flatten().to(acc)
        n_safe = n.clamp_min(1.0)
        offset = s1 / n_safe  # local mean - shift
        if synchronise:
            mean, var, n = _combine_ranks(n, k + offset, (s2 - s1 * offset).clamp_min(0.0), group)
        else:
            mean, var = k + offset, (s2 / n_safe - offset.square()).clamp_min(0.0)
        mean = torch.where(n > 0, mean, torch.zeros_like(mean))
        stat_dtype = torch.promote_types(x.dtype, torch.float32)
        if running_mean is not None:
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            factor = 1.0 / num_batches_tracked.to(stat_dtype) if momentum is None else momentum
            has_data = n > 0
            unbiased = var * (n / (n - 1).clamp_min(1.0))
            old_mean, old_var = running_mean.to(stat_dtype), running_var.to(stat_dtype)
            new_mean = torch.lerp(old_mean, mean.to(stat_dtype), factor)
            new_var = torch.lerp(old_var, unbiased.to(stat_dtype), factor)
            running_mean.copy_(torch.where(has_data, new_mean, old_mean))
            running_var.copy_(torch.where(has_data, new_var, old_var))
        param_dtype = weight.dtype if weight is not None else stat_dtype
        centre = (mean - k).to(param_dtype)  # the mean of xs at active sites
        var_p = var.to(param_dtype)
        y = F.batch_norm(xs, centre, var_p, weight, bias, False, 0.0, eps).mul_(mask)
        ctx.save_for_backward(xs, mask, weight, centre, var_p, n)
        ctx.eps, ctx.group, ctx.synchronise, ctx.fmt = eps, group, synchronise, fmt
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        xs, mask, weight, centre, var, n = ctx.saved_tensors
        g = (grad * mask).contiguous(memory_format=ctx.fmt)  # only active sites carry gradient
        w = weight if weight is not None else torch.ones_like(centre)
        # The native kernel's sums: sum g * xhat and sum g (g is 0 wherever xs is not an active value).
        # Given as saved statistics (train=True): CUDA's eval-mode path asserts on them being absent.
        stat = torch.promote_types(centre.dtype, torch.float32)
        _, sum_g_xhat, sum_g = torch.ops.aten.native_batch_norm_backward(
            g, xs, w, None, None, centre.to(stat), torch.rsqrt(var.to(stat) + ctx.eps), True, ctx.eps,
            [False, True, True])
        grad_w = sum_g_xhat if weight is not None and ctx.needs_input_grad[2] else None
        grad_b = sum_g if ctx.has_bias and ctx.needs_input_grad[3] else None
        if not ctx.needs_input_grad[0]:
            return None, None, grad_w, grad_b, None, None, None, None, None, None, None
        if ctx.synchronise:
            packed = _all_reduce(torch.cat([sum_g, sum_g_xhat]), ctx.group)
            sum_g, sum_g_xhat = packed.chunk(2)
        # grad_x = a * (g - sum g / n - xhat * sum(g xhat) / n) at active sites, 0 elsewhere, with
        # a = w * rstd and xhat = (xs - centre) * rstd: a * g + beta * xs + alpha * mask.
        acc = torch.promote_types(var.dtype, torch.float32)
        rstd = torch.rsqrt(var.to(acc) + ctx.eps)
        a = w.to(acc) * rstd
        k = a / n.to(acc).clamp_min(1.0)
        beta = -k * rstd * sum_g_xhat.to(acc)
        alpha = -k * sum_g.to(acc) - beta * centre.to(acc)
        shape = (1, -1) + (1,) * (xs.dim() - 2)
        dt = xs.dtype
        grad_x = g.mul_(a.view(shape).to(dt)).addcmul_(xs, beta.view(shape).to(dt))
        grad_x = grad_x.addcmul_(mask, alpha.view(shape).to(dt))
        return grad_x, None, grad_w, grad_b, None, None, None, None, None, None, None


def _centred_sums(xs: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sum xs and sum xs^2 (fp32 accumulation or better), in one pass where possible.

    The native BatchNorm backward kernel computes exactly these two sums in one read when asked for
    the weight and bias gradients of ``grad_out = input = xs`` with mean 0 and rstd 1. Its CPU
    channels-last path accumulates in plain fp32 over the whole batch, so there two cascade sums
    (torch.sum) are used instead.
    """
    c = xs.shape[1]
    acc = torch.promote_types(xs.dtype, torch.float32)
    if xs.device.type == "cpu" and _memory_format(xs) in (torch.channels_last, torch.channels_last_3d):
        xf = xs.to(acc)
        return xf.sum(dims), xf.square().sum(dims)
    ones = torch.ones(c, dtype=acc, device=xs.device)
    zeros = torch.zeros(c, dtype=acc, device=xs.device)
    # mean 0 and rstd 1 passed as the saved statistics (train=True): the CUDA kernel requires them there.
    _, s2, s1 = torch.ops.aten.native_batch_norm_backward(
        xs, xs, ones, None, None, zeros, ones, True, 0.0, [False, True, True])
    return s1, s2


def _combine_ranks(n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, group
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SyncBatchNorm: pooled mean, biased variance and count from every rank's (n, mean, M2).

    All-gathered rather than all-reduced as raw sums, and combined pairwise-free (Chan et al.): the
    between-rank term sum n_r (mean_r - mean)^2 has no cancellation, whatever |mean| / std.
    """
    local = torch.cat([n, mean, m2]).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    stacked = torch.stack(parts)  # (ranks, 1 + 2C)
    c = mean.numel()
    counts, means, m2s = stacked[:, :1], stacked[:, 1:1 + c], stacked[:, 1 + c:]
    total = counts.sum(0)
    pooled = (counts * means).sum(0) / total.clamp_min(1.0)
    spread = m2s.sum(0) + (counts * (means - pooled).square()).sum(0)
    return pooled, spread / total.clamp_min(1.0), total


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _normalise(x, mask, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps,
               num_batches_tracked=None, sync_group=None, synchronise=False):
    update = running_mean is not None and use_batch_stats
    return _MaskedBatchNorm.apply(
        x, mask.to(x.dtype), weight, bias, running_mean if update else None, running_var if update else None,
        num_batches_tracked if update else None, momentum, eps, sync_group, synchronise)


def masked_batch_norm(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mask-aware forward of a BatchNorm module (nn.BatchNorm*, SyncBatchNorm, timm BatchNormAct2d).

    In eval mode (running statistics) BatchNorm is a per-channel affine map and runs unchanged. In
    training mode the normalised map is zero at masked sites (before timm's drop and activation).
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


def _zeroed_module(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """What the rewrite calls: :func:`masked_batch_norm`, exactly zero at masked sites.

    Zeroing here, where training mode gets it for free inside the normalisation, spares the mask
    multiply that the next convolution would otherwise need, and with it a second saved copy of the
    activation (ReLU keeps its output for backward, the convolution its masked input).
    """
    y = masked_batch_norm(module, x, mask)
    if mask is None:
        return y
    in_training = module.training or module.running_mean is None
    if in_training and module_preserves_zero(getattr(module, "drop", None)) and module_preserves_zero(
            getattr(module, "act", None)):
        return y
    return apply_mask(y, mask)


def _zeroed_fn(mask, input, running_mean=None, running_var=None, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """What the rewrite calls for ``F.batch_norm``: :func:`masked_batch_norm_fn`, zero at masked sites."""
    y = masked_batch_norm_fn(mask, input, running_mean, running_var, weight, bias, training, momentum, eps)
    if mask is None or training or running_mean is None:
        return y
    return apply_mask(y, mask)


#: Every function the rewrite may call for a BatchNorm (how ``SparseEncoder.norm_type`` recognises one).
BATCH_NORM_FUNCTIONS = (masked_batch_norm, masked_batch_norm_fn, _zeroed_module, _zeroed_fn)


def _channel_first(rule):
    """``rule`` for a BatchNorm, refusing a map whose dim 1 is spatial (BatchNorm normalises dim 1)."""

    def checked(view: NodeView) -> Decision:
        info = view.info(view.arg(0, "input"))
        if isinstance(info, Info) and info.spatial is not None and 1 in info.spatial:
            raise Unsupported("BatchNorm over a map whose dim 1 is spatial (channels-last); BatchNorm "
                              "normalises dim 1, which would mix sites")
        return rule(view)

    return checked


#: The rule for BatchNorm over feature maps of every spatial rank (1-D nets use BatchNorm1d on (B, C, L)).
FEATURE_MAP_RULE = _channel_first(zero_output(statistic_rule(_zeroed_module)))
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LazyBatchNorm1d,
             nn.LazyBatchNorm2d, nn.LazyBatchNorm3d):
    register_rule(_cls, FEATURE_MAP_RULE)
register_rule(F.batch_norm, _channel_first(zero_output(statistic_rule(_zeroed_fn))))


def _register_timm() -> None:
    try:
        from timm.layers import norm_act
    except ImportError:  # timm is optional for the core
        return
    from ._kinds import module_is_nonneg

    for name in ("BatchNormAct2d", "SyncBatchNormAct"):
        cls = getattr(norm_act, name, None)
        if cls is not None:
            register_rule(cls, zero_output(statistic_rule(
                _zeroed_module, nonneg=lambda v: module_is_nonneg(getattr(v.module, "act", None)))))


_register_timm()
