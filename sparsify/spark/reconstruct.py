"""Write SparK reconstructions as one picture a person can read.

Images: a row per sample, input | masked | composite (any columns). Volumes: for each sample a few
axial, coronal and sagittal slices (or, for video, a few frames), a row per slice with the same
columns. Signals: a line plot per column, masked stretches shaded. Optionally a header row names each
column (and, for volumes, each row says which slice it shows), so a picture read on its own says what
it shows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import SparsifyError

__all__ = ["COLUMN_LABELS", "VIEWS", "save_reconstructions"]

_MASK_GREY = 0.5
_SHADE_GREY = 0.88  # masked stretches of a signal plot
#: Display size the slices of a small volume are enlarged towards (nearest-neighbour, whole factors).
_VOLUME_DISPLAY = 96
_PLOT_HEIGHT = 80
_PLOT_WIDTH = (256, 1024)  # a signal plot is at least / at most this wide
#: Line colours of a signal's channels (cycled).
_PALETTE = ((0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.4, 0.74))

#: Header text for each column key of :meth:`SparK.reconstruct`'s output.
COLUMN_LABELS = {
    "input": "input",
    "masked": "masked input",
    "reconstruction": "prediction",
    "composite": "prediction in visible input",
}

#: Views of a volume (B, C, D, H, W): the axis each one slices and what a slice shows. ``"frames"`` is
#: ``"axial"`` named for video (B, C, T, H, W).
VIEWS = {"axial": 0, "coronal": 1, "sagittal": 2, "frames": 0}
_VIEW_ROW = {"axial": "axial z={}", "coronal": "coronal y={}", "sagittal": "sagittal x={}", "frames": "frame t={}"}


def _wrap_words(text: str, width: int, measure) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide (a long word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and measure(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _font():
    from PIL import ImageFont

    font = ImageFont.load_default()
    measure = lambda t: font.getbbox(t)[2] - font.getbbox(t)[0]  # noqa: E731
    line_h = max(1, font.getbbox("Ag")[3] - font.getbbox("Ag")[1]) + 2
    return font, measure, line_h


def _header(texts: Sequence[str], tile_w: int, pad: int, total_w: int, left: int = 0) -> np.ndarray:
    """A white (h, total_w, 3) float strip with each text centred above its column (columns start
    ``left`` pixels in)."""
    from PIL import ImageDraw

    font, measure, line_h = _font()
    wrapped = [_wrap_words(t, tile_w, measure) for t in texts]
    height = pad + line_h * max(len(w) for w in wrapped) + 2
    strip = Image.new("RGB", (total_w, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for j, lines in enumerate(wrapped):
        x0 = left + pad + j * (tile_w + pad)
        for k, line in enumerate(lines):
            x = x0 + max(0, (tile_w - measure(line)) // 2)
            draw.text((x, pad + k * line_h), line, fill=(0, 0, 0), font=font)
    return np.asarray(strip, dtype=np.float32) / 255.0


def _row_labels(texts: Sequence[str], heights: Sequence[int], tops: Sequence[int], total_h: int) -> np.ndarray:
    """A white (total_h, w, 3) float strip with each text left-aligned at its row's vertical centre."""
    from PIL import ImageDraw

    font, measure, line_h = _font()
    width = 4 + max(measure(t) for t in texts) + 4
    strip = Image.new("RGB", (width, total_h), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for text, h, top in zip(texts, heights, tops):
        draw.text((4, top + max(0, (h - line_h) // 2)), text, fill=(0, 0, 0), font=font)
    return np.asarray(strip, dtype=np.float32) / 255.0


def _to_display(img: torch.Tensor) -> torch.Tensor:
    """(C, H, W) in [0, 1] -> (H, W, 3): RGB for 3+ channels (first three), grey otherwise."""
    c = img.shape[0]
    if c >= 3:
        rgb = img[:3]
    else:
        rgb = img.mean(dim=0, keepdim=True).expand(3, -1, -1)
    return rgb.permute(1, 2, 0)


def _unit_mapper(
    c: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``to_unit(x, lo, hi)``: x (C, ...) to [0, 1] with ``x * std + mean`` when given, else min/max."""
    if mean is not None or std is not None:
        m = torch.tensor(list(mean) if mean is not None else [0.0] * c)
        s = torch.tensor(list(std) if std is not None else [1.0] * c)
        if m.shape[0] != c or s.shape[0] != c:
            raise SparsifyError(
                f"mean/std need {c} values (one per channel), got {m.shape[0]} and {s.shape[0]}"
            )

    def to_unit(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().cpu()
        if mean is not None or std is not None:
            shape = (-1,) + (1,) * (x.dim() - 1)
            return (x * s.view(shape) + m.view(shape)).clamp(0.0, 1.0)
        return ((x - lo) / (hi - lo).clamp(min=1e-12)).clamp(0.0, 1.0)

    return to_unit


def _images_grid(out, columns, n, to_unit, pad) -> tuple[np.ndarray, int, list[str], list[int], list[int]]:
    """2-D: a row per sample."""
    ref = out["input"]
    _, _, h, w = ref.shape
    pixel_mask = out.get("mask")
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
    return canvas, w, [], [], []


def _slice_positions(length: int, count: int) -> list[int]:
    """``count`` evenly spaced interior positions along an axis of ``length`` (fewer when it is short)."""
    return sorted({min(length - 1, (j + 1) * length // (count + 1)) for j in range(max(1, count))})


def _volumes_grid(out, columns, n, to_unit, pad, views, num_slices):
    """3-D: per sample, per view, per slice a row of the columns' slices (one column slot per column,
    as wide as the widest view)."""
    ref = out["input"]
    size = tuple(ref.shape[2:])
    pixel_mask = out.get("mask")
    zoom = max(1, _VOLUME_DISPLAY // max(size))
    rows: list[list[np.ndarray]] = []
    texts: list[str] = []
    for i in range(n):
        inp = ref[i].detach().float().cpu()
        lo, hi = inp.min(), inp.max()
        units = {name: to_unit(out[name][i], lo, hi) for name in columns}
        visible = pixel_mask[i].detach().cpu().bool() if pixel_mask is not None else None
        for view in views:
            axis = VIEWS[view]
            for pos in _slice_positions(size[axis], num_slices):
                tiles = []
                for name in columns:
                    tile = _to_display(units[name].select(axis + 1, pos))
                    if name == "masked" and visible is not None:
                        vis = visible.select(axis + 1, pos)[0].unsqueeze(-1)
                        tile = torch.where(vis, tile, torch.full_like(tile, _MASK_GREY))
                    tiles.append(tile.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1).numpy())
                rows.append(tiles)
                texts.append(f"#{i} " + _VIEW_ROW[view].format(pos))
    slot = max(t[0].shape[1] for t in rows)
    k = len(columns)
    heights = [t[0].shape[0] for t in rows]
    canvas = np.ones((sum(heights) + (len(rows) + 1) * pad, k * slot + (k + 1) * pad, 3), dtype=np.float32)
    tops, y = [], pad
    for tiles, th in zip(rows, heights):
        for j, tile in enumerate(tiles):
            x0 = pad + j * (slot + pad)
            canvas[y : y + th, x0 : x0 + tile.shape[1]] = tile
        tops.append(y)
        y += th + pad
    return canvas, slot, texts, heights, tops


def _signals_grid(out, columns, n, to_unit, pad):
    """1-D: per sample a row of line plots, one per column; masked stretches shaded."""
    from PIL import ImageDraw

    ref = out["input"]
    length = ref.shape[-1]
    pixel_mask = out.get("mask")
    w = min(max(length, _PLOT_WIDTH[0]), _PLOT_WIDTH[1])
    h = _PLOT_HEIGHT
    xs = np.linspace(0, w - 1, length) if length > 1 else np.array([w / 2])
    k = len(columns)
    canvas = np.ones((n * h + (n + 1) * pad, k * w + (k + 1) * pad, 3), dtype=np.float32)
    for i in range(n):
        inp = ref[i].detach().float().cpu()
        lo, hi = inp.min(), inp.max()
        visible = pixel_mask[i, 0].detach().cpu().bool().numpy() if pixel_mask is not None else np.ones(length, bool)
        for j, name in enumerate(columns):
            values = to_unit(out[name][i], lo, hi).numpy()  # (C, L) in [0, 1]
            plot = Image.new("RGB", (w, h), (255, 255, 255))
            draw = ImageDraw.Draw(plot)
            grey = int(255 * (_MASK_GREY if name == "masked" else _SHADE_GREY) + 0.5)  # as the images round
            step = (w - 1) / max(1, length - 1)
            for t in np.flatnonzero(~visible):
                draw.rectangle((xs[t] - step / 2, 0, xs[t] + step / 2, h - 1), fill=(grey, grey, grey))
            for ch, line in enumerate(values):
                colour = tuple(int(255 * v) for v in _PALETTE[ch % len(_PALETTE)])
                ys = (1.0 - line) * (h - 3) + 1
                shown = visible if name == "masked" else np.ones(length, bool)
                start = 0
                while start < length:  # one polyline per visible stretch
                    if not shown[start]:
                        start += 1
                        continue
                    end = start
                    while end + 1 < length and shown[end + 1]:
                        end += 1
                    points = [(float(xs[t]), float(ys[t])) for t in range(start, end + 1)]
                    if len(points) == 1:
                        points.append(points[0])
                    draw.line(points, fill=colour, width=1)
                    start = end + 1
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y0 : y0 + h, x0 : x0 + w] = np.asarray(plot, dtype=np.float32) / 255.0
    return canvas, w, [], [], []


def save_reconstructions(
    out: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    columns: Sequence[str] = ("input", "masked", "composite"),
    max_images: int = 8,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    padding: int = 2,
    labels: bool | Sequence[str] = False,
    views: Sequence[str] = ("axial", "coronal", "sagittal"),
    num_slices: int = 3,
) -> Path:
    """Save the output of :meth:`SparK.reconstruct` as a picture (PNG unless the suffix says otherwise).

    The columns are ``columns`` (any keys of ``out``; ``"reconstruction"`` is also available). What a
    row is depends on the data:

    * images (B, C, H, W): a row per sample;
    * volumes (B, C, D, H, W): per sample, for each of ``views`` (``"axial"`` slices along D,
      ``"coronal"`` along H, ``"sagittal"`` along W; ``"frames"`` for video (T, H, W)), ``num_slices``
      evenly spaced slices, a row each; small volumes are enlarged by a whole factor;
    * signals (B, C, L): a row per sample of line plots (one colour per channel), masked stretches
      shaded.

    Values are mapped to the screen with ``x * std + mean`` per channel when ``mean``/``std`` are given
    (e.g. the normalisation the data used), otherwise with the input's own per-sample min/max, shared by
    the sample's tiles. Masked patches of the ``"masked"`` column are painted grey (left out of its
    plot for signals). Inputs with 3 or more channels show their first three as RGB, others as grey.

    Args:
        out: dict from ``SparK.reconstruct``.
        path: file to write; parent folders are created.
        columns: which images to show, left to right.
        max_images: at most this many samples (the first ones).
        mean, std: per-channel normalisation to undo for display.
        padding: white pixels between tiles.
        labels: ``True`` adds a header row naming each column (:data:`COLUMN_LABELS`) and, for volumes,
            a label per row (sample, view, slice); a sequence gives one text per column instead.
        views: the views of a volume, from :data:`VIEWS` (ignored for images and signals).
        num_slices: slices per view of a volume.

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
    if ref.dim() not in (3, 4, 5):
        raise SparsifyError(
            "reconstructions must be (B, C, H, W) images, (B, C, D, H, W) volumes or (B, C, L) signals, "
            f"got {tuple(ref.shape)}"
        )
    b, c = ref.shape[:2]
    n = max(1, min(int(max_images), b))
    for name in columns:
        if out[name].shape[0] < n or out[name].shape[2:] != ref.shape[2:]:
            raise SparsifyError(
                f"image {name!r} has shape {tuple(out[name].shape)}, unlike the input {tuple(ref.shape)}"
            )
    to_unit = _unit_mapper(c, mean, std)
    pad = max(0, int(padding))
    k = len(columns)
    if ref.dim() == 5:
        unknown = [v for v in views if v not in VIEWS]
        if unknown or not views:
            raise SparsifyError(f"views {unknown or list(views)} are not available; choose from {sorted(VIEWS)}")
        if int(num_slices) < 1:
            raise SparsifyError(f"num_slices must be at least 1, got {num_slices}")
        canvas, tile_w, row_texts, heights, tops = _volumes_grid(out, columns, n, to_unit, pad, views, int(num_slices))
    elif ref.dim() == 4:
        canvas, tile_w, row_texts, heights, tops = _images_grid(out, columns, n, to_unit, pad)
    else:
        canvas, tile_w, row_texts, heights, tops = _signals_grid(out, columns, n, to_unit, pad)
    if labels is not False and labels is not None:
        texts = [COLUMN_LABELS.get(c, c) for c in columns] if labels is True else [str(t) for t in labels]
        if len(texts) != k:
            raise SparsifyError(f"labels needs one text per column ({k}), got {len(texts)}")
        left = 0
        if row_texts:
            side = _row_labels(row_texts, heights, tops, canvas.shape[0])
            canvas = np.concatenate([side, canvas], axis=1)
            left = side.shape[1]
        canvas = np.concatenate([_header(texts, tile_w, pad, canvas.shape[1], left), canvas], axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray((canvas * 255.0 + 0.5).astype(np.uint8), mode="RGB")
    image.save(path, format="PNG" if path.suffix.lower() in ("", ".png") else None)
    return path
