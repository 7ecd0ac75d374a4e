"""Write SparK reconstructions as one grid picture: a row per sample, input | masked | composite.

Optionally a header row names each column, so a picture read on its own says what it shows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import SparsifyError

__all__ = ["COLUMN_LABELS", "save_reconstructions"]

_MASK_GREY = 0.5

#: Header text for each column key of :meth:`SparK.reconstruct`'s output.
COLUMN_LABELS = {
    "input": "input",
    "masked": "masked input",
    "reconstruction": "prediction",
    "composite": "prediction in visible input",
}


def _wrap_words(text: str, width: int, measure) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide (a long word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and measure(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _header(texts: Sequence[str], tile_w: int, pad: int, total_w: int) -> np.ndarray:
    """A white (h, total_w, 3) float strip with each text centred above its column."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = lambda t: font.getbbox(t)[2] - font.getbbox(t)[0]
    line_h = max(1, font.getbbox("Ag")[3] - font.getbbox("Ag")[1]) + 2
    wrapped = [_wrap_words(t, tile_w, measure) for t in texts]
    height = pad + line_h * max(len(w) for w in wrapped) + 2
    strip = Image.new("RGB", (total_w, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for j, lines in enumerate(wrapped):
        x0 = pad + j * (tile_w + pad)
        for k, line in enumerate(lines):
            x = x0 + max(0, (tile_w - measure(line)) // 2)
            draw.text((x, pad + k * line_h), line, fill=(0, 0, 0), font=font)
    return np.asarray(strip, dtype=np.float32) / 255.0


def _to_display(img: torch.Tensor) -> torch.Tensor:
    """(C, H, W) in [0, 1] -> (H, W, 3): RGB for 3+ channels (first three), grey otherwise."""
    c = img.shape[0]
    if c >= 3:
        rgb = img[:3]
    else:
        rgb = img.mean(dim=0, keepdim=True).expand(3, -1, -1)
    return rgb.permute(1, 2, 0)


def save_reconstructions(
    out: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    columns: Sequence[str] = ("input", "masked", "composite"),
    max_images: int = 8,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    padding: int = 2,
    labels: bool | Sequence[str] = False,
) -> Path:
    """Save the output of :meth:`SparK.reconstruct` as a grid image (PNG unless the suffix says otherwise).

    Each row is one sample; the columns are ``columns`` (any keys of ``out``; ``"reconstruction"`` is
    also available). Pixel values are mapped to the screen with ``x * std + mean`` per channel when
    ``mean``/``std`` are given (e.g. the ImageNet normalisation the data used), otherwise with the
    input's own per-sample min/max, shared by the row. Masked patches of the ``"masked"`` column are
    painted grey. Images with 3 or more channels show their first three as RGB, others as grey.

    Args:
        out: dict from ``SparK.reconstruct``.
        path: file to write; parent folders are created.
        columns: which images to show, left to right.
        max_images: at most this many rows (the first samples).
        mean, std: per-channel normalisation to undo for display.
        padding: white pixels between tiles.
        labels: ``True`` adds a header row naming each column (:data:`COLUMN_LABELS`); a sequence gives
            one text per column instead.

    Returns:
        the written path.
    """
    if not isinstance(out, Mapping) or "input" not in out:
        raise SparsifyError("save_reconstructions expects the dict returned by SparK.reconstruct(x)")
    missing = [c for c in columns if c not in out]
    if missing or not columns:
        raise SparsifyError(
            f"columns {missing or list(columns)} are not available; choose from {sorted(out)}"
        )
    ref = out["input"]
    if ref.dim() != 4:
        raise SparsifyError(f"reconstruction images must be (B, C, H, W), got {tuple(ref.shape)}")
    b, c, h, w = ref.shape
    n = max(1, min(int(max_images), b))
    for name in columns:
        if out[name].shape[0] < n or out[name].shape[-2:] != ref.shape[-2:]:
            raise SparsifyError(
                f"image {name!r} has shape {tuple(out[name].shape)}, unlike the input {tuple(ref.shape)}"
            )

    def to_unit(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().cpu()
        if mean is not None or std is not None:
            m = torch.tensor(list(mean) if mean is not None else [0.0] * c).view(-1, 1, 1)
            s = torch.tensor(list(std) if std is not None else [1.0] * c).view(-1, 1, 1)
            if m.shape[0] != c or s.shape[0] != c:
                raise SparsifyError(
                    f"mean/std need {c} values (one per channel), got {m.shape[0]} and {s.shape[0]}"
                )
            return (x * s + m).clamp(0.0, 1.0)
        return ((x - lo) / (hi - lo).clamp(min=1e-12)).clamp(0.0, 1.0)

    pixel_mask = out.get("mask")
    pad = max(0, int(padding))
    k = len(columns)
    canvas = np.ones((n * h + (n + 1) * pad, k * w + (k + 1) * pad, 3), dtype=np.float32)
    for i in range(n):
        inp = ref[i].detach().float().cpu()
        lo, hi = inp.min(), inp.max()
        for j, name in enumerate(columns):
            tile = _to_display(to_unit(out[name][i], lo, hi))
            if name == "masked" and pixel_mask is not None:
                visible = pixel_mask[i].detach().cpu().bool().view(h, w, 1)
                tile = torch.where(visible, tile, torch.full_like(tile, _MASK_GREY))
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y0 : y0 + h, x0 : x0 + w] = tile.numpy()
    if labels is not False and labels is not None:
        texts = [COLUMN_LABELS.get(c, c) for c in columns] if labels is True else [str(t) for t in labels]
        if len(texts) != k:
            raise SparsifyError(f"labels needs one text per column ({k}), got {len(texts)}")
        canvas = np.concatenate([_header(texts, w, pad, canvas.shape[1]), canvas], axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray((canvas * 255.0 + 0.5).astype(np.uint8), mode="RGB")
    image.save(path, format="PNG" if path.suffix.lower() in ("", ".png") else None)
    return path
