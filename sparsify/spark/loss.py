"""SparK's masked-patch reconstruction loss, for images, volumes and signals.

Target and prediction are cut into patches (R x R for images, a x b x c blocks for volumes, runs of
length R for signals), flattened to (B, L, prod(patch) * C). Each *target* patch is normalised by its
own mean and standard deviation (unbiased variance + 1e-6 under the square root); the squared error is
averaged within each patch, then over the masked patches only. The prediction is compared as is: the
decoder predicts normalised patches directly.

:func:`masked_mse_loss` is the plain alternative the published 3-D SparK (nnssl) uses: the squared
error against the *unnormalised* target, averaged over every masked voxel and channel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._geometry import Geometry, per_axis
from ..errors import SparsifyError
from ._patches import patchify

__all__ = ["PATCH_NORM_EPS", "LOSSES", "patch_statistics", "masked_patch_loss", "masked_mse_loss"]

#: Added to each patch's unbiased variance before the square root.
PATCH_NORM_EPS = 1e-6

#: Accepted values of ``SparK(loss=...)``: SparK's per-patch normalised loss, or plain masked MSE.
LOSSES = ("spark", "mse")


def patch_statistics(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch ``mean`` and ``sqrt(unbiased var + 1e-6)`` of (B, L, N) patches, each (B, L, 1)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=True)
    return mean, (var + PATCH_NORM_EPS).sqrt()


def _patched(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    patch: int | Sequence[int],
    check_nonempty: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the inputs; return prediction and target patches (B, L, N) in at least fp32."""
    if pred.shape != target.shape:
        raise SparsifyError(
            f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape"
        )
    b, _, *size = target.shape
    if not size:
        raise SparsifyError(f"the target needs at least one spatial dimension, got {tuple(target.shape)}")
    p = per_axis(patch, len(size), "patch size")
    if any(s % q for s, q in zip(size, p)):
        shown = patch if isinstance(patch, int) else Geometry.describe(p)
        raise SparsifyError(f"image size {Geometry.describe(size)} is not a multiple of the patch size {shown}")
    grid = tuple(s // q for s, q in zip(size, p))
    if tuple(mask.shape) != (b, 1, *grid):
        raise SparsifyError(
            f"mask shape {tuple(mask.shape)} does not match the patch grid {(b, 1, *grid)}"
        )
    if check_nonempty and not torch.compiler.is_compiling() and bool(mask.all()):
        raise SparsifyError(
            "nothing is masked in this batch, so there is nothing to reconstruct and the loss is "
            "undefined; pass a mask with at least one False (masked) patch, or a mask ratio that masks "
            "at least one patch"
        )
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    return patchify(pred.to(dtype), p), patchify(target.to(dtype), p)


def _mean_over_masked(per_patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L) per-patch values over the masked (False) cells of ``mask``."""
    weight = (~mask.bool()).flatten(1).to(per_patch.dtype)  # 1 = masked
    return (per_patch * weight).sum() / weight.sum().clamp(min=1.0)


def masked_patch_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    patch: int | Sequence[int],
    check_nonempty: bool = True,
) -> torch.Tensor:
    """Mean over masked patches of the per-patch MSE against the per-patch normalised target.

    Args:
        pred: decoder output (B, C, *size), in normalised-patch units.
        target: the original batch (B, C, *size): (B, C, H, W) images, (B, C, D, H, W) volumes,
            (B, C, L) signals.
        mask: bool (B, 1, *(size // patch)), True = visible; only False patches count.
        patch: the patch size: an int for every axis, or one int per axis.
        check_nonempty: raise :class:`SparsifyError` when nothing in the batch is masked. The check reads
            one value back to the host, so it is skipped while compiling; pass False when the caller
            already knows some patch is masked (SparK does for its own random masks).

    Returns:
        scalar loss, in fp32 (or fp64 for fp64 inputs).
    """
    pred_p, target_p = _patched(pred, target, mask, patch, check_nonempty)
    mean, std = patch_statistics(target_p)
    per_patch = (pred_p - (target_p - mean) / std).square().mean(dim=-1)  # (B, L)
    return _mean_over_masked(per_patch, mask)


def masked_mse_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    patch: int | Sequence[int],
    check_nonempty: bool = True,
) -> torch.Tensor:
    """Plain squared error against the unnormalised target, averaged over every channel of every voxel
    (pixel, sample) of the masked patches (nnssl's 3-D SparK loss). Arguments as :func:`masked_patch_loss`;
    ``pred`` is in the target's own units."""
    pred_p, target_p = _patched(pred, target, mask, patch, check_nonempty)
    # Every patch has the same number of values, so the mean of per-patch means over the masked
    # patches is the mean over all masked values.
    return _mean_over_masked((pred_p - target_p).square().mean(dim=-1), mask)
