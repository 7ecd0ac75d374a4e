"""Masked statistics without host synchronisation (design.md section 5), in few passes over memory.

The mask is used as a 0/1 weight: sums over active sites, counts from the mask, no ``nonzero``, no
boolean indexing, no ``.item()``.

Precision without fp64 passes: a one-pass variance E[x^2] - E[x]^2 cancels catastrophically when
|mean| >> std. Instead of accumulating in fp64 (a cast of the whole tensor, twice the memory traffic),
the data are *shifted* by a value of their own: ``shift`` is x at the first active site of each
statistic's region, so ``x - shift`` is of the order of the spread and fp32 sums of it and of its
square keep fp32 precision. The mean and variance are shift-invariant, so the shift needs no gradient.
Only the per-channel (per-group) results are combined in fp64.
"""

from __future__ import annotations

import torch

__all__ = ["masked_sums", "moments_from_sums", "masked_moments", "apply_mask", "first_active",
           "shifted_sums", "mask_count"]


def _acc64(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64


def first_active(x: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """x at the first active site of every region reduced over ``dims`` (keepdim shape, no grad).

    ``mask`` (0/1, same rank as ``x``, broadcastable) decides which site is first: row-major order over
    the reduced dims where the mask varies; where it is broadcast, index 0. A region without any active
    site gets x at its first site (any finite value works: its sums are zero). Found with ``argmax`` and
    ``take``: no host synchronisation, no copy of ``x`` whatever its memory layout.
    """
    ndim = x.dim()
    kept = [d for d in range(ndim) if d not in dims]
    varying = [d for d in dims if mask.shape[d] != 1]
    sizes = [x.shape[d] for d in range(ndim)]
    strides = [1] * ndim  # row-major strides of x's logical shape (what torch.take indexes)
    for d in range(ndim - 2, -1, -1):
        strides[d] = strides[d + 1] * sizes[d + 1]
    index = torch.zeros((), dtype=torch.long, device=x.device)
    if varying:
        m = mask.detach()
        rest = [d for d in dims if d not in varying]  # size 1 in the mask
        m = m.permute(*kept, *varying, *rest).reshape(*[m.shape[d] for d in kept], -1)
        flat = m.argmax(-1)  # first maximum: the first active site (0 when none is active)
        flat = flat.view([mask.shape[d] if d in kept else 1 for d in range(ndim)])
        for d in reversed(varying):
            index = index + (flat % mask.shape[d]) * strides[d]
            flat = flat // mask.shape[d]
    for d in kept:
        shape = [1] * ndim
        shape[d] = sizes[d]
        index = index + torch.arange(sizes[d], device=x.device).view(shape) * strides[d]
    out_shape = [sizes[d] if d in kept else 1 for d in range(ndim)]
    return torch.take(x.detach(), index.expand(out_shape))


def mask_count(x: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Number of active sites over ``dims`` (keepdim), counting broadcast mask dims at x's size."""
    n = mask.sum(dims, keepdim=True, dtype=dtype)
    repeat = 1
    for d in dims:  # a plain loop: torch.compile does not trace math.prod over a generator
        if mask.shape[d] == 1:
            repeat *= x.shape[d]
    return n * repeat if repeat != 1 else n


def shifted_sums(x: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shift, sum (x - shift), sum (x - shift)^2, count) over active sites, keepdim.

    ``shift`` is :func:`first_active` (x's dtype); the sums are in at least fp32 and differentiable in
    ``x``; the count is fp64 (fp32 on MPS).
    """
    shift = first_active(x, mask, dims)
    acc = torch.promote_types(x.dtype, torch.float32)
    centred = (x.to(acc) - shift.to(acc)) * mask.to(acc)
    s1 = centred.sum(dims, keepdim=True)
    s2 = centred.square().sum(dims, keepdim=True)
    return shift, s1, s2, mask_count(x, mask, dims, _acc64(x))


def moments_from_sums(s1: torch.Tensor, s2: torch.Tensor, n: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance from sums, returned in ``dtype``; a zero count gives 0, 0 (no NaN).

    With raw sums (no shift) this is only accurate when the sums are: see the module docstring.
    """
    n_safe = n.clamp_min(1.0)
    mean = s1 / n_safe
    var = (s2 / n_safe - mean.square()).clamp_min(0.0)
    return mean.to(dtype), var.to(dtype)


def masked_moments(x: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, biased variance and count over ``dims`` at active sites (fp32 or fp64, keepdim=True).

    Differentiable in ``x``. A region without active sites gives 0, 0, 0.
    """
    return _MaskedMoments.apply(x, mask, dims)


class _MaskedMoments(torch.autograd.Function):
    """The moments as one autograd node: backward needs only ``x`` (which the normalisation keeps
    anyway) and the mask, not the centred copy that autograd through the sums would save."""

    @staticmethod
    def forward(ctx, x, mask, dims):
        shift, s1, s2, n = shifted_sums(x, mask, dims)
        acc = _acc64(x)
        offset, var = moments_from_sums(s1.to(acc), s2.to(acc), n, acc)
        mean = torch.where(n > 0, shift.to(acc) + offset, torch.zeros_like(offset))
        dtype = torch.promote_types(x.dtype, torch.float32)
        mean, var, n = mean.to(dtype), var.to(dtype), n.to(dtype)
        ctx.save_for_backward(x, mask, mean, n)
        ctx.mark_non_differentiable(n)
        return mean, var, n

    @staticmethod
    def backward(ctx, grad_mean, grad_var, _grad_n):
        # d mean / dx = mask / n; d var / dx = 2 mask (x - mean) / n (mean and var are shift-free).
        x, mask, mean, n = ctx.saved_tensors
        inv_n = 1.0 / n.clamp_min(1.0)
        grad = (x.to(mean.dtype) - mean).mul_(2 * grad_var * inv_n if grad_var is not None else 0.0)
        if grad_mean is not None:
            grad = grad.add_(grad_mean * inv_n)
        return grad.mul_(mask.to(grad.dtype)).to(x.dtype), None, None


def masked_sums(x: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (sum x, sum x^2, count) over ``dims`` at active sites, in fp64, keepdim=True.

    ``mask`` is 0/1, broadcastable to ``x``. Sizes of reduced dims where the mask is broadcast (size 1)
    multiply the count, so a (B, 1, H, W) mask counts C * active sites when C is reduced too. Computed
    from :func:`shifted_sums`; prefer :func:`masked_moments` for statistics (raw sums cancel).
    """
    shift, s1, s2, n = shifted_sums(x, mask, dims)
    acc = _acc64(x)
    k, s1, s2 = shift.to(acc), s1.to(acc), s2.to(acc)
    return n * k + s1, s2 + 2 * k * s1 + n * k.square(), n


def apply_mask(x: torch.Tensor, mask: torch.Tensor | None, in_place: bool = False) -> torch.Tensor:
    """Zero ``x`` at masked sites (``mask`` is 0/1 and broadcastable); identity when mask is None.

    ``in_place``: multiply ``x`` itself, for a tensor that no autograd node saved (an op's fresh output
    that only the caller holds): no new tensor, and nothing else to keep for backward.
    """
    if mask is None:
        return x
    return x.mul_(mask.to(x.dtype)) if in_place else x * mask.to(x.dtype)
