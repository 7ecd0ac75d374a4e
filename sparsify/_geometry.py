"""Spatial geometry in any number of dimensions: rank, per-axis strides, patch and grid (private).

A network's spatial rank is the rank of its input minus two (1 for signals, 2 for images, 3 for
volumes and video). Strides and the mask patch are per axis: a video stem strides (1, 2, 2) and
nnU-Net plans strides like [1, 2, 2] for thick slices. Where every axis agrees the public attributes
report a plain int, so 2-D code that reads ``enc.downsample_ratio == 32`` keeps working.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import SparsifyError

__all__ = ["Geometry", "per_axis", "compact", "AXIS_NAMES"]

#: Names of the spatial axes by rank, for messages.
AXIS_NAMES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}

PerAxis = tuple[int, ...]


def per_axis(value: int | Sequence[int], rank: int, what: str = "size") -> PerAxis:
    """``value`` as one positive int per spatial axis: an int is repeated, a sequence must have ``rank``
    entries."""
    if isinstance(value, bool):
        raise SparsifyError(f"{what} must be an int or {rank} ints, got {value!r}")
    if isinstance(value, int):
        values: tuple = (value,) * rank
    else:
        try:
            values = tuple(value)
        except TypeError:
            raise SparsifyError(f"{what} must be an int or a sequence of {rank} ints, got {value!r}") from None
        if len(values) != rank:
            raise SparsifyError(
                f"{what} {tuple(values)} has {len(values)} entries but the input has {rank} spatial "
                f"dimension{'s' if rank != 1 else ''} ({' x '.join(AXIS_NAMES.get(rank, ('?',) * rank))})"
            )
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) and not (hasattr(v, "__index__")):
            raise SparsifyError(f"{what} must hold ints, got {value!r}")
        out.append(int(v))
    if any(v < 1 for v in out):
        raise SparsifyError(f"{what} must be positive, got {value!r}")
    return tuple(out)


def compact(values: Sequence[int]) -> int | PerAxis:
    """A per-axis tuple as a plain int when every axis agrees (the public, backward-compatible form)."""
    values = tuple(int(v) for v in values)
    return values[0] if len(set(values)) == 1 else values


@dataclass(frozen=True)
class Geometry:
    """The mask geometry of an encoder: spatial rank and the per-axis patch (the total stride R by
    default). Masks live on the grid ``size // patch`` with shape ``(B, 1, *grid)``."""

    rank: int
    patch: PerAxis

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise SparsifyError(f"a spatial rank of at least 1 is needed, got {self.rank}")
        if len(self.patch) != self.rank:
            raise SparsifyError(f"patch {self.patch} does not have {self.rank} entries")

    @classmethod
    def of(cls, rank: int, patch: int | Sequence[int]) -> Geometry:
        return cls(rank, per_axis(patch, rank, "patch size"))

    @property
    def ratio(self) -> int | PerAxis:
        """The patch as the public attributes report it: an int when isotropic."""
        return compact(self.patch)

    @property
    def axes(self) -> tuple[str, ...]:
        return AXIS_NAMES.get(self.rank, tuple(f"axis{i}" for i in range(self.rank)))

    def fits(self, size: Sequence[int]) -> bool:
        return len(size) == self.rank and all(s % p == 0 and s >= p for s, p in zip(size, self.patch))

    def grid(self, size: Sequence[int]) -> PerAxis:
        """The mask grid of an input of spatial ``size``; a clear error when it does not fit."""
        size = tuple(int(s) for s in size)
        if len(size) != self.rank:
            raise SparsifyError(
                f"input has spatial size {size} ({len(size)}-D) but the encoder is {self.rank}-D "
                f"({' x '.join(self.axes)})"
            )
        if not self.fits(size):
            raise SparsifyError(
                f"input size {self.describe(size)} is not a multiple of the patch size "
                f"{self.describe(self.patch)} on every axis; use e.g. {self.describe(self.nearest(size)[0])} "
                f"or {self.describe(self.nearest(size)[1])}"
            )
        return tuple(s // p for s, p in zip(size, self.patch))

    def nearest(self, size: Sequence[int]) -> tuple[PerAxis, PerAxis]:
        """Two sizes that fit: each axis rounded down (at least one patch) and up to a multiple."""
        down = tuple(max(p, (s // p) * p) for s, p in zip(size, self.patch))
        up = tuple(math.ceil(s / p) * p for s, p in zip(size, self.patch))
        if up == down:
            up = tuple(u + p for u, p in zip(up, self.patch))
        return down, up

    @staticmethod
    def describe(size: Sequence[int]) -> str:
        """``224x224`` / ``16x64x64`` / ``512``: sizes as messages write them."""
        return "x".join(str(int(s)) for s in size)
