"""A hand-written float64 reference of nnssl's SparK3D encoder semantics, for nnU-Net residual encoders.

Written from the published semantics (not from nnssl's code): the input is zeroed at masked voxels
first; every convolution sees zeros at masked sites and its output is zeroed there again (simulated
submanifold sparse convolution); InstanceNorm takes its per-sample, per-channel mean and biased
variance over the visible voxels only; pooling averages the visible voxels of each window (where a
window lies inside one block, as at every resolution no coarser than a block, that is the plain
average SparK's sparse pooling takes); the mask
is drawn in blocks (16^3 in nnssl) that may be finer than the network's total stride (32).

At a resolution no coarser than the block, every cell lies inside one block, so the mask there is the
block mask repeated, and nnssl and sparsify agree. At coarser resolutions they differ on purpose:
``coarse="dense"`` runs every layer whose output is coarser than a block without any mask (nnssl, as
its code reads: masked zeros enter those convolutions, norms and pools as values) and ``coarse="any"``
makes a cell visible when any of its blocks is (sparsify's choice, which keeps the contract).

The walk interprets dynamic_network_architectures' building blocks by what they compute (a stem of
conv-norm-nonlin, residual blocks ``nonlin2(conv2(conv1(x)) + skip(x))`` with an average-pool and 1x1
projection skip), with functional ops of its own, so it shares no code path with torch.fx or sparsify.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class MaskPyramid:
    """The visible-voxel mask at any resolution, from a block mask ``(B, 1, *grid)`` of bool."""

    def __init__(self, block_mask: torch.Tensor, block: Sequence[int], coarse: str = "dense") -> None:
        if coarse not in ("dense", "any"):
            raise ValueError(f"coarse must be 'dense' or 'any', got {coarse!r}")
        self.block = tuple(block)
        self.coarse = coarse
        voxels = block_mask.double()
        for axis, size in enumerate(self.block):
            voxels = voxels.repeat_interleave(size, dim=2 + axis)
        self.voxels = voxels  # (B, 1, *input size), 1.0 = visible

    def at(self, shape: Sequence[int]) -> torch.Tensor | None:
        """The mask for a map of spatial ``shape``; None where nnssl runs dense (coarser than a block)."""
        full = self.voxels.shape[2:]
        stride = [f // s for f, s in zip(full, shape)]
        if all(s <= b for s, b in zip(stride, self.block)):
            index = tuple(slice(None, None, s) for s in stride)  # each cell lies inside one block
            return self.voxels[(slice(None), slice(None), *index)]
        if self.coarse == "dense":
            return None
        pool = getattr(F, f"max_pool{len(shape)}d")
        return pool(self.voxels, stride, stride)  # visible when any voxel (so any block) under it is


def _masked(y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return y if mask is None else y * mask


def conv(module: nn.Module, x: torch.Tensor, masks: MaskPyramid) -> torch.Tensor:
    fn = getattr(F, f"conv{x.dim() - 2}d")
    y = fn(x, module.weight, module.bias, module.stride, module.padding, module.dilation, module.groups)
    return _masked(y, masks.at(y.shape[2:]))


def instance_norm(module: nn.Module, x: torch.Tensor, masks: MaskPyramid) -> torch.Tensor:
    mask = masks.at(x.shape[2:])
    spatial = tuple(range(2, x.dim()))
    if mask is None:
        mask = torch.ones_like(x[:, :1])
    n = mask.sum(spatial, keepdim=True)
    mean = (x * mask).sum(spatial, keepdim=True) / n.clamp(min=1)
    var = ((x - mean) ** 2 * mask).sum(spatial, keepdim=True) / n.clamp(min=1)  # biased, as InstanceNorm
    y = (x - mean) / torch.sqrt(var + module.eps)
    if module.affine:
        shape = (1, -1) + (1,) * len(spatial)
        y = y * module.weight.view(shape) + module.bias.view(shape)
    return y * mask


def avg_pool(module: nn.Module, x: torch.Tensor, masks: MaskPyramid) -> torch.Tensor:
    pool = getattr(F, f"avg_pool{x.dim() - 2}d")
    kernel, stride = module.kernel_size, module.stride
    dense = pool(x, kernel, stride)
    mask_out = masks.at(dense.shape[2:])
    if mask_out is None:  # nnssl: a layer whose output is coarser than a block runs dense (masked zeros count)
        return dense
    mask_in = masks.at(x.shape[2:])
    total = pool(x * mask_in, kernel, stride)
    count = pool(mask_in, kernel, stride)
    y = total / count.clamp(min=1e-12) * (count > 0)  # mean over the visible voxels of the window
    return y * mask_out


def _layer(module: nn.Module, x: torch.Tensor, masks: MaskPyramid) -> torch.Tensor:
    """One leaf layer, by what it computes."""
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return conv(module, x, masks)
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        assert not module.track_running_stats, "the reference covers nnU-Net's InstanceNorm (no running stats)"
        return instance_norm(module, x, masks)
    if isinstance(module, nn.LeakyReLU):
        return F.leaky_relu(x, module.negative_slope)  # f(0) = 0: masked sites stay zero
    if isinstance(module, nn.ReLU):
        return F.relu(x)
    if isinstance(module, nn.modules.pooling._AvgPoolNd):
        return avg_pool(module, x, masks)
    raise NotImplementedError(f"the reference has no rule for {type(module).__name__}")


def block(module: nn.Module, x: torch.Tensor, masks: MaskPyramid) -> torch.Tensor:
    """Any dynamic_network_architectures block used by ResidualEncoder / PlainConvEncoder."""
    name = type(module).__name__
    if name in ("StackedConvBlocks", "StackedResidualBlocks"):
        return block(module.convs if name == "StackedConvBlocks" else module.blocks, x, masks)
    if isinstance(module, nn.Sequential):
        for child in module:
            x = block(child, x, masks)
        return x
    if name == "ConvDropoutNormReLU":
        return block(module.all_modules, x, masks)
    if name == "BasicBlockD":
        assert not module.apply_stochastic_depth and not module.apply_se
        residual = block(module.skip, x, masks) if isinstance(module.skip, nn.Module) else x
        out = block(module.conv2, block(module.conv1, x, masks), masks) + residual
        return _layer(module.nonlin2, out, masks) if isinstance(module.nonlin2, nn.Module) else out
    return _layer(module, x, masks)


def encoder_features(encoder: nn.Module, x: torch.Tensor, masks: MaskPyramid) -> list[torch.Tensor]:
    """The maps a ResidualEncoder / PlainConvEncoder returns (``return_skips=True``): each stage's output."""
    x = x * masks.voxels  # the input is zeroed at masked voxels first
    if getattr(encoder, "stem", None) is not None:
        x = block(encoder.stem, x, masks)
    out = []
    for stage in encoder.stages:
        x = block(stage, x, masks)
        out.append(x)
    return out


def masked_voxel_mse(pred: torch.Tensor, target: torch.Tensor, masks: MaskPyramid) -> torch.Tensor:
    """nnssl's loss: the mean squared error over the masked voxels (all channels) only."""
    hidden = 1.0 - masks.voxels
    return ((pred - target) ** 2 * hidden).sum() / (hidden.sum() * target.shape[1])


def block_grid(size: Sequence[int], block: Sequence[int]) -> tuple[int, ...]:
    """The block-mask grid of an input size (each side a multiple of its block)."""
    assert all(s % b == 0 for s, b in zip(size, block)), (size, block)
    return tuple(s // b for s, b in zip(size, block))


def stride_of(feature: torch.Tensor, size: Sequence[int]) -> tuple[int, ...]:
    return tuple(math.ceil(s / f) for s, f in zip(size, feature.shape[2:]))
