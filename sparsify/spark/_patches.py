"""Patch geometry shared by the SparK model, its loss and its pictures (private)."""

from __future__ import annotations

import torch

from ..errors import SparsifyError

__all__ = ["repeat_mask", "patchify", "unpatchify"]


def repeat_mask(mask: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Repeat a (B, 1, h, w) mask to ``size`` by nearest-neighbour repetition (any dtype, bool kept).

    ``size`` must be a whole multiple of (h, w) in both dimensions.
    """
    b, c, h, w = mask.shape
    out_h, out_w = int(size[0]), int(size[1])
    if (out_h, out_w) == (h, w):
        return mask
    if out_h % h or out_w % w:
        raise SparsifyError(
            f"cannot repeat a {h}x{w} mask to {out_h}x{out_w}: the feature map must be a whole multiple "
            "of the mask grid (check that the input size is a multiple of the downsample ratio)"
        )
    fh, fw = out_h // h, out_w // w
    return mask.view(b, c, h, 1, w, 1).expand(b, c, h, fh, w, fw).reshape(b, c, out_h, out_w)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, patch * patch * C), patches in row-major order, pixel-major within."""
    b, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    x = x.reshape(b, c, gh, patch, gw, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, patch * patch * C) -> (B, C, H, W) for a (gh, gw) grid."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * patch, gw * patch)
