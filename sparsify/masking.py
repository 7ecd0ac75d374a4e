"""Random patch masks, drawn on the device without host synchronisation.

Convention everywhere in sparsify: a mask is a bool tensor of shape (B, 1, h, w) on the grid of the
coarsest feature map (one cell per R x R image patch), and True means *visible* ("active").
"""

from __future__ import annotations

import torch

from .errors import SparsifyError

__all__ = ["random_mask", "num_visible", "check_mask"]


def num_visible(num_patches: int, ratio: float) -> int:
    """How many patches stay visible when ``ratio`` of ``num_patches`` are masked."""
    return int(round(num_patches * (1.0 - ratio)))


def random_mask(
    batch: int,
    size: tuple[int, int] | int,
    ratio: float = 0.6,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw a random patch mask, True = visible.

    Every sample keeps exactly ``round(h * w * (1 - ratio))`` visible patches (at least one), chosen
    uniformly at random. The draw happens on ``device`` (the generator's device when not given) with
    no host synchronisation, so it is safe inside a compiled or CUDA-graphed step.

    Args:
        batch: number of samples B.
        size: (h, w) of the patch grid, i.e. the image size divided by the downsample ratio.
        ratio: fraction of patches to mask, in [0, 1).
        generator: optional ``torch.Generator`` for reproducible masks.
        device: where to create the mask.

    Returns:
        bool tensor of shape (B, 1, h, w).
    """
    if isinstance(size, int):
        size = (size, size)
    h, w = (int(s) for s in size)
    if batch < 1 or h < 1 or w < 1:
        raise SparsifyError(f"random_mask needs batch >= 1 and a non-empty grid, got batch={batch}, size={size}")
    if not 0.0 <= ratio < 1.0:
        raise SparsifyError(f"mask ratio must be in [0, 1), got {ratio}; 0.6 is the SparK default")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    num_patches = h * w
    keep = max(1, num_visible(num_patches, ratio))
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    # The `keep` smallest noise values per row are visible: rank via argsort, compare to keep.
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return (ranks < keep).view(batch, 1, h, w)


def check_mask(mask: torch.Tensor, batch: int, grid: tuple[int, int], device: torch.device | None = None) -> None:
    """Raise SparsifyError unless ``mask`` is a bool (B, 1, h, w) tensor for this batch and grid (on
    ``device`` when given: the input's)."""
    if not isinstance(mask, torch.Tensor):
        raise SparsifyError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.device.type == "meta" or (device is not None and mask.device != device):
        raise SparsifyError(
            f"mask is on device {mask.device} but the input is on {device}; "
            + ("a meta tensor has no values. " if mask.device.type == "meta" else "")
            + "Create the mask on the input's device (mask.to(x.device), or random_mask(..., device=x.device))"
        )
    if mask.dtype != torch.bool:
        raise SparsifyError(
            f"mask must be a bool tensor (True = visible), got dtype {mask.dtype}; use mask.bool() "
            "or sparsify.random_mask(...)"
        )
    expected = (batch, 1, grid[0], grid[1])
    if tuple(mask.shape) != expected:
        raise SparsifyError(
            f"mask has shape {tuple(mask.shape)} but this input needs {expected} "
            f"(batch, 1, H // R, W // R); draw one with sparsify.random_mask({batch}, {grid})"
        )
