"""The torch layer of each spatial rank that densify and the decoder build (private)."""

from __future__ import annotations

import torch.nn as nn

from ..errors import SparsifyError

__all__ = ["check_rank", "CONV", "CONV_TRANSPOSE", "BATCH_NORM"]

CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_TRANSPOSE: dict[int, type[nn.Module]] = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BATCH_NORM: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def check_rank(spatial_dims: object) -> int:
    """``spatial_dims`` as an int in (1, 2, 3); a clear error otherwise."""
    if isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int) or spatial_dims not in CONV:
        raise SparsifyError(
            f"SparK's densify and decoder support 1, 2 or 3 spatial dimensions, got {spatial_dims!r}"
        )
    return spatial_dims
