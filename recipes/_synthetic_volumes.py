"""Offline synthetic 3-D phantoms: ellipsoids of random size, place and brightness in noise (pure numpy)."""

from __future__ import annotations

import numpy as np

__all__ = ["phantom", "BLOBS_PER_CLASS"]

# Class k of a phantom holds BLOBS_PER_CLASS[k] ellipsoids (class = index % 2), so a k-NN monitor has
# something to separate: few large blobs against many small ones.
BLOBS_PER_CLASS = (2, 6)


def phantom(index: int, size: tuple[int, int, int], channels: int = 1, seed: int = 0) -> tuple[np.ndarray, int]:
    """One phantom volume (channels, D, H, W) float32 in roughly [0, 1], and its class (0 or 1).

    Deterministic in (seed, index). Channels share the blobs but weight them differently (like two MRI
    contrasts of one anatomy), with their own noise.
    """
    label = index % len(BLOBS_PER_CLASS)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), 0x5CA25])
    d, h, w = (int(s) for s in size)
    zz, yy, xx = np.meshgrid(
        np.linspace(-1, 1, d, dtype=np.float32),
        np.linspace(-1, 1, h, dtype=np.float32),
        np.linspace(-1, 1, w, dtype=np.float32),
        indexing="ij",
    )
    blobs = BLOBS_PER_CLASS[label]
    big = label == 0
    out = np.zeros((channels, d, h, w), dtype=np.float32)
    weights = rng.uniform(0.3, 1.0, size=(blobs, channels)).astype(np.float32)
    for b in range(blobs):
        radii = rng.uniform(0.25, 0.5, 3) if big else rng.uniform(0.1, 0.22, 3)
        centre = rng.uniform(-0.6, 0.6, 3)
        inside = (
            ((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 + ((xx - centre[2]) / radii[2]) ** 2
        ) <= 1.0
        for c in range(channels):
            out[c][inside] = np.maximum(out[c][inside], weights[b, c])
    out += rng.normal(0.0, 0.05, size=out.shape).astype(np.float32)
    return np.clip(out, 0.0, None), label
