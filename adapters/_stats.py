"""Masked statistics without host synchronisation (design.md section 5).

The mask is used as a 0/1 weight: sums over active sites, counts from the mask, no ``nonzero``, no
boolean indexing, no ``.item()``. Sums accumulate in fp64 (fp32 on MPS) whatever the input dtype.
"""

from __future__ import annotations

import torch

__all__ = ["masked_sums", "moments_from_sums", "masked_moments", "apply_mask"]


def masked_sums(x: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (sum x, sum x^2, count) over ``dims`` at active sites, in fp64, keepdim=True.

    ``mask`` is 0/1, broadcastable to ``x``. Sizes of reduced dims where the mask is broadcast (size 1)
    multiply the count, so a (B, 1, H, W) mask counts C * active sites when C is reduced too.
    """
    # float64 accumulators: the one-pass variance E[x^2] - E[x]^2 then stays accurate to fp32 precision
    # (a two-pass variance would cost another full pass over memory). MPS has no float64.
    acc = torch.float32 if x.device.type == "mps" else torch.float64
    xm = x * mask.to(x.dtype)
    # Both sums in fp64: E[x]^2 cancels against E[x^2] when |mean| >> std, so s1 needs the same
    # precision as s2 (fp32 partial sums gave 3e-4 relative errors in GroupNorm outputs).
    s1 = xm.sum(dims, keepdim=True, dtype=acc)
    s2 = torch.linalg.vector_norm(xm, 2, dims, keepdim=True, dtype=acc).square()
    n = mask.sum(dims, keepdim=True, dtype=acc)
    repeat = 1
    for d in dims:  # a plain loop: torch.compile does not trace math.prod over a generator
        if mask.shape[d] == 1:
            repeat *= x.shape[d]
    if repeat != 1:
        n = n * repeat
    return s1, s2, n


def moments_from_sums(s1: torch.Tensor, s2: torch.Tensor, n: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance from sums, returned in ``dtype``; a zero count gives 0, 0 (no NaN)."""
    n_safe = n.clamp_min(1.0)
    mean = s1 / n_safe
    var = (s2 / n_safe - mean.square()).clamp_min(0.0)
    return mean.to(dtype), var.to(dtype)


def masked_moments(x: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, biased variance and count over ``dims`` at active sites (fp32 or fp64, keepdim=True)."""
    s1, s2, n = masked_sums(x, mask, dims)
    dtype = torch.promote_types(x.dtype, torch.float32)
    mean, var = moments_from_sums(s1, s2, n, dtype)
    return mean, var, n.to(dtype)


def apply_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero ``x`` at masked sites (``mask`` is 0/1 and broadcastable); identity when mask is None."""
    if mask is None:
        return x
    return x * mask.to(x.dtype)
