"""Intensity rules, crops, padding and flips for volumes (see :mod:`.volumes` for the rules in words)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .cli import RecipeError

__all__ = ["IntensityRule", "parse_intensity", "CT_WINDOWS", "plan_axis", "STATS_VOXELS"]

# Named CT windows as (lowest, highest) HU, from the usual (level, width) pairs:
# lung L-600/W1500, soft tissue L40/W400, bone L400/W1800, brain L40/W80.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-1350.0, 150.0),
    "soft": (-160.0, 240.0),
    "bone": (-500.0, 1300.0),
    "brain": (0.0, 80.0),
}

# Percentile statistics are taken on at most about this many voxels (a regular strided subsample), so
# that a large scan's statistics cost one pass over a fraction of it.
STATS_VOXELS = 1 << 21

_FORMS = (
    "'percentile' (clip to the 0.5/99.5 percentiles of the foreground, then z-score), "
    "'percentile:LO,HI' (other percentiles, 0 <= LO < HI <= 100), "
    "'ct:L,H' (clip to L..H Hounsfield units, scale to 0..1), "
    f"'ct:{'/'.join(CT_WINDOWS)}' (named CT windows) or 'none' (raw values)"
)


def _subsample(a: np.ndarray, limit: int = STATS_VOXELS) -> np.ndarray:
    """A regular strided subsample of a 3-D array with at most about ``limit`` voxels."""
    step = max(1, math.ceil((a.size / limit) ** (1 / 3))) if a.size > limit else 1
    return np.asarray(a[::step, ::step, ::step])


@dataclass(frozen=True)
class IntensityRule:
    """How voxel values are normalised, per volume and per channel.

    Attributes:
        kind: ``"percentile"``, ``"ct"`` or ``"none"``.
        low, high: percentiles (``percentile``) or Hounsfield units (``ct``); unused for ``none``.
        text: the rule as the user wrote it (normalised), for the run header.
    """

    kind: str
    low: float = 0.0
    high: float = 0.0
    text: str = ""

    def describe(self) -> str:
        """The rule in words, for the run header."""
        if self.kind == "percentile":
            return f"{self.text}: clip to the {self.low:g}/{self.high:g} percentiles of the foreground, z-score"
        if self.kind == "ct":
            return f"{self.text}: window {self.low:g}..{self.high:g} HU scaled to 0..1"
        return "none: raw voxel values"

    def stats(self, channel: np.ndarray) -> tuple[float, ...]:
        """What :meth:`apply` needs from one channel of one whole volume (D, H, W).

        ``percentile``: (low clip, high clip, mean, std, minimum) where the foreground is the voxels
        above the volume's minimum (all voxels when it is constant), percentiles with linear
        interpolation, and mean/std of the clipped foreground. Others: (minimum,).
        """
        sample = _subsample(channel).astype(np.float64, copy=False)
        finite = sample[np.isfinite(sample)]
        if finite.size == 0:
            finite = np.zeros(1)
        vmin = float(finite.min())
        if self.kind != "percentile":
            return (vmin,)
        fg = finite[finite > vmin]
        if fg.size == 0:
            fg = finite
        lo, hi = (float(v) for v in np.percentile(fg, [self.low, self.high]))
        clipped = np.clip(fg, lo, hi)
        return (lo, hi, float(clipped.mean()), float(clipped.std()), vmin)

    def apply(self, x: np.ndarray, stats: Sequence[float]) -> np.ndarray:
        """Normalise voxels ``x`` of one channel with that channel's :meth:`stats`; float32 out."""
        x = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        if self.kind == "percentile":
            lo, hi, mean, std = stats[:4]
            out = np.clip(x, lo, hi) - np.float32(mean)
            return out / np.float32(std) if std > 1e-8 else out
        if self.kind == "ct":
            return (np.clip(x, self.low, self.high) - np.float32(self.low)) / np.float32(self.high - self.low)
        return x

    def background(self, stats: Sequence[float]) -> float:
        """The value the channel's minimum maps to: what padding fills with."""
        return float(self.apply(np.asarray([stats[-1]], dtype=np.float32), stats)[0])


def parse_intensity(text: str | IntensityRule) -> IntensityRule:
    """Parse an intensity rule: ``percentile``, ``percentile:LO,HI``, ``ct:L,H``, ``ct:NAME`` or ``none``.

    Raises:
        RecipeError: for anything else, listing the accepted forms.
    """
    if isinstance(text, IntensityRule):
        return text
    raw = str(text).strip().lower().replace(" ", "")
    bad = RecipeError(f"unknown intensity rule '{text}'; use {_FORMS}")
    if raw == "none":
        return IntensityRule("none", text="none")
    if raw == "percentile":
        return IntensityRule("percentile", 0.5, 99.5, "percentile")
    head, _, tail = raw.partition(":")
    if head not in ("percentile", "ct") or not tail:
        raise bad
    if head == "ct" and tail in CT_WINDOWS:
        lo, hi = CT_WINDOWS[tail]
        return IntensityRule("ct", lo, hi, f"ct:{tail}")
    parts = tail.split(",")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise bad from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise bad
    if head == "percentile" and not (0 <= lo < hi <= 100):
        raise bad
    return IntensityRule(head, lo, hi, f"{head}:{lo:g},{hi:g}")


def plan_axis(size: int, crop: int, g: torch.Generator | None) -> tuple[int, int, int]:
    """(source start, length taken, offset in the crop) along one axis.

    A long axis gives a random window (``g``) or the centred one (``g is None``); a short axis is taken
    whole and placed at a random (or centred) offset inside the crop, the rest padded.
    """
    if size >= crop:
        start = int(torch.randint(0, size - crop + 1, (1,), generator=g)) if g is not None else (size - crop) // 2
        return start, crop, 0
    room = crop - size
    offset = int(torch.randint(0, room + 1, (1,), generator=g)) if g is not None else room // 2
    return 0, size, offset
