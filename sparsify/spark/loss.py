"""SparK's masked-patch reconstruction loss.

Target and prediction are cut into R x R patches, flattened to (B, L, R * R * C). Each *target* patch
is normalised by its own mean and standard deviation (unbiased variance + 1e-6 under the square root);
the squared error is averaged within each patch, then over the masked patches only. The prediction is
compared as is: the decoder predicts normalised patches directly.
"""

from __future__ import annotations

import torch

from ..errors import SparsifyError
from ._patches import patchify

__all__ = ["PATCH_NORM_EPS", "patch_statistics", "masked_patch_loss"]

#: Added to each patch's unbiased variance before the square root.
PATCH_NORM_EPS = 1e-6


def patch_statistics(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch ``mean`` and ``sqrt(unbiased var + 1e-6)`` of (B, L, N) patches, each (B, L, 1)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=True)
    return mean, (var + PATCH_NORM_EPS).sqrt()


def masked_patch_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    patch: int,
    check_nonempty: bool = True,
) -> torch.Tensor:
    """Mean over masked patches of the per-patch MSE against the per-patch normalised target.

    Args:
        pred: decoder output (B, C, H, W), in normalised-patch units.
        target: the original image (B, C, H, W).
        mask: bool (B, 1, H // patch, W // patch), True = visible; only False patches count.
        patch: the patch size R.
        check_nonempty: raise :class:`SparsifyError` when nothing in the batch is masked. The check reads
            one value back to the host, so it is skipped while compiling; pass False when the caller
            already knows some patch is masked (SparK does for its own random masks).

    Returns:
        scalar loss, in fp32 (or fp64 for fp64 inputs).
    """
    if pred.shape != target.shape:
        raise SparsifyError(
            f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape"
        )
    b, _, h, w = target.shape
    if h % patch or w % patch:
        raise SparsifyError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    if tuple(mask.shape) != (b, 1, h // patch, w // patch):
        raise SparsifyError(
            f"mask shape {tuple(mask.shape)} does not match the patch grid {(b, 1, h // patch, w // patch)}"
        )
    if check_nonempty and not torch.compiler.is_compiling() and bool(mask.all()):
        raise SparsifyError(
            "nothing is masked in this batch, so there is nothing to reconstruct and the loss is "
            "undefined; pass a mask with at least one False (masked) patch, or a mask ratio that masks "
            "at least one patch"
        )
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    target_p = patchify(target.to(dtype), patch)
    pred_p = patchify(pred.to(dtype), patch)
    mean, std = patch_statistics(target_p)
    per_patch = (pred_p - (target_p - mean) / std).square().mean(dim=-1)  # (B, L)
    weight = (~mask.bool()).flatten(1).to(per_patch.dtype)  # 1 = masked
    return (per_patch * weight).sum() / weight.sum().clamp(min=1.0)
