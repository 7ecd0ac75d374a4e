"""Feature geometry: stage labels, feature sizes, layouts, masks at a resolution, garbage fills."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


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


def per_axis(value: int | Sequence[int], rank: int) -> tuple[int, ...]:
    """An int stride or patch as one value per spatial axis (tuples pass through)."""
    return (int(value),) * rank if isinstance(value, int) else tuple(int(v) for v in value)


def patch_of(enc: nn.Module, rank: int) -> tuple[int, ...]:
    """The encoder's mask patch per axis (``patch_size``, else its downsample ratio)."""
    patch = getattr(enc, "patch_size", None)
    return per_axis(patch if patch is not None else enc.downsample_ratio, rank)


def ratio_of(enc: nn.Module, rank: int) -> tuple[int, ...]:
    """What inputs must be multiples of, per axis: the encoder's ``size_multiple`` (its total stride,
    or more when a down-up block inside a stage pools below it), else its downsample ratio."""
    multiple = getattr(enc, "size_multiple", None)
    return per_axis(multiple if multiple is not None else enc.downsample_ratio, rank)


def _feature_hw(enc: nn.Module, i: int, size: Sequence[int]) -> tuple[int, ...] | None:
    """The spatial size of feature ``i`` for an input of spatial ``size`` (any rank)."""
    strides = getattr(enc, "feature_strides", None)
    if strides is None or i >= len(strides):
        return None
    s = per_axis(strides[i], len(size))
    return tuple(n // k for n, k in zip(size, s))


def _to_nchw(feat: torch.Tensor, hw: Sequence[int] | None) -> torch.Tensor:
    """View a feature as (B, C, *spatial); accepts channels-last (B, *spatial, C) features too."""
    rank = len(hw) if hw is not None else feat.dim() - 2
    if feat.dim() != rank + 2:
        raise AssertionError(f"expected a {rank + 2}-D feature map, got shape {tuple(feat.shape)}")
    if hw is None or tuple(feat.shape[2:]) == tuple(hw):
        return feat
    if tuple(feat.shape[1 : 1 + rank]) == tuple(hw):
        return feat.permute(0, rank + 1, *range(1, rank + 1))
    raise AssertionError(f"feature of shape {tuple(feat.shape)} does not have the expected spatial size {tuple(hw)}")


def _mask_at(mask: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
    """A (B, 1, *grid) bool mask at spatial size ``hw`` (bool): each patch repeated on finer maps; on
    maps coarser than the patch a cell is visible when any of its patches is (as the encoder does)."""
    if tuple(mask.shape[2:]) == tuple(hw):
        return mask.bool()
    from sparsify.rewrite import _resize

    return _resize(mask.float(), tuple(int(s) for s in hw)).bool()


def _locate(index: int, shape: Sequence[int]) -> str:
    names = {3: ("b", "c", "x"), 4: ("b", "c", "y", "x"), 5: ("b", "c", "z", "y", "x")}.get(
        len(shape), tuple(f"d{i}" for i in range(len(shape))))
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
