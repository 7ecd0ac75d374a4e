"""Feature geometry: stage labels, feature sizes, layouts, masks at a resolution, garbage fills."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def _stage_label(enc: nn.Module, i: int) -> str:
    stages = getattr(enc, "stages", None)
    strides = getattr(enc, "feature_strides", None)
    name = None
    if stages is not None and i < len(stages):
        st = stages[i]
        name = getattr(st, "name", None)
        if name is None and isinstance(st, (tuple, list)) and st:
            name = st[0]
    stride = strides[i] if strides is not None and i < len(strides) else None
    parts = [f"feature {i}"]
    if name is not None:
        parts.append(f"stage {name!r}")
    if stride is not None:
        parts.append(f"stride {stride}")
    return ", ".join(parts)


def _feature_hw(enc: nn.Module, i: int, size: tuple[int, int]) -> tuple[int, int] | None:
    strides = getattr(enc, "feature_strides", None)
    if strides is None or i >= len(strides):
        return None
    s = int(strides[i])
    return (size[0] // s, size[1] // s)


def _to_nchw(feat: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
    """View a feature as (B, C, h, w); accepts channels-last (B, h, w, C) features too."""
    if feat.dim() != 4:
        raise AssertionError(f"expected a 4-D feature map, got shape {tuple(feat.shape)}")
    if hw is None or tuple(feat.shape[-2:]) == tuple(hw):
        return feat
    if tuple(feat.shape[1:3]) == tuple(hw):
        return feat.permute(0, 3, 1, 2)
    raise AssertionError(f"feature of shape {tuple(feat.shape)} does not have the expected spatial size {hw}")


def _mask_at(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (B, 1, h, w) bool mask to ``hw`` (bool)."""
    if tuple(mask.shape[-2:]) == tuple(hw):
        return mask.bool()
    return F.interpolate(mask.float(), size=tuple(hw), mode="nearest").bool()


def _locate(index: int, shape: Sequence[int]) -> str:
    names = ("b", "c", "y", "x") if len(shape) == 4 else tuple(f"d{i}" for i in range(len(shape)))
    coords = []
    for size in reversed(shape):
        coords.append(index % size)
        index //= size
    coords.reverse()
    return "(" + ", ".join(f"{n}={c}" for n, c in zip(names, coords)) + ")"


def _garbage_like(x: torch.Tensor, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Random values of the same rough magnitude as ``x`` (so that leaks are visible)."""
    std = float(x.float().std()) if x.numel() > 1 else 1.0
    std = std if std > 0 and std == std else 1.0
    g = torch.randn(*shape, generator=generator, dtype=torch.float32) * (3.0 * std) + 1.0
    return g.to(device=x.device, dtype=x.dtype)
