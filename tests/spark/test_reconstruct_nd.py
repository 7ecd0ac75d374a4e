"""save_reconstructions for volumes (slices of each view, or video frames) and signals (line plots)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sparsify.errors import SparsifyError
from sparsify.spark import SparK, save_reconstructions
from sparsify.spark.reconstruct import _slice_positions

from .toy_encoder import ToyEncoder

COLUMNS = ("input", "masked", "reconstruction", "composite")


def _volume_out(size=(8, 16, 24), strides=((1, 2, 2), (2, 4, 4)), b=2):
    torch.manual_seed(0)
    spark = SparK(ToyEncoder(1, (4, 8), strides, "batch", 3), decoder_width=8).eval()
    x = torch.randn(b, 1, *size)
    return spark.reconstruct(x, spark.draw_mask(x, torch.Generator().manual_seed(0)))


def test_slice_positions_are_evenly_spaced_and_inside():
    assert _slice_positions(16, 3) == [4, 8, 12]
    assert _slice_positions(2, 3) == [0, 1]
    assert _slice_positions(1, 3) == [0]


def test_volume_picture_shows_slices_of_every_view(tmp_path):
    out = _volume_out()
    pad = 2
    path = save_reconstructions(out, tmp_path / "v" / "recon.png", columns=COLUMNS, padding=pad)
    img = np.asarray(Image.open(path))
    d, h, w = 8, 16, 24
    zoom = 96 // 24  # small volumes are enlarged by a whole factor
    # per sample: 3 axial (h x w), 3 coronal (d x w), 3 sagittal (d x h) rows; slots as wide as w
    rows = 3 * (h + d + d) * zoom
    assert img.shape == (2 * rows + (2 * 9 + 1) * pad, 4 * w * zoom + 5 * pad, 3)
    # the first row is axial slice z = 2 of sample 0: its masked column is grey exactly where masked
    z = _slice_positions(d, 3)[0]
    visible = out["mask"][0, 0, z].numpy().repeat(zoom, 0).repeat(zoom, 1)
    tile = img[pad : pad + h * zoom, 2 * pad + w * zoom : 2 * pad + 2 * w * zoom]
    assert (tile[~visible] == 128).all()
    assert (~visible).any() and not (tile[visible] == 128).all()
    # and its input column is the slice itself, min/max-mapped over the sample's volume
    x = out["input"][0, 0]
    want = ((x[z] - x.min()) / (x.max() - x.min())).numpy().repeat(zoom, 0).repeat(zoom, 1)
    got = img[pad : pad + h * zoom, pad : pad + w * zoom, 0] / 255.0
    np.testing.assert_allclose(got, want, atol=1 / 255 + 1e-6)


def test_video_frames_and_labels(tmp_path):
    out = _volume_out(size=(8, 16, 16))
    plain = save_reconstructions(out, tmp_path / "a.png", views=("frames",), num_slices=4, max_images=1)
    img = np.asarray(Image.open(plain))
    zoom = 96 // 16
    assert img.shape[0] == 4 * 16 * zoom + 5 * 2  # four frames of one sample
    labelled = np.asarray(
        Image.open(save_reconstructions(out, tmp_path / "b.png", views=("frames",), num_slices=4, max_images=1,
                                        labels=True))
    )
    assert labelled.shape[0] > img.shape[0] and labelled.shape[1] > img.shape[1]  # header and row labels
    assert (labelled < 128).any()  # text was drawn


def test_volume_picture_errors(tmp_path):
    out = _volume_out()
    with pytest.raises(SparsifyError, match="views"):
        save_reconstructions(out, tmp_path / "r.png", views=("transverse",))
    with pytest.raises(SparsifyError, match="num_slices"):
        save_reconstructions(out, tmp_path / "r.png", num_slices=0)
    with pytest.raises(SparsifyError, match="volumes"):
        save_reconstructions({"input": torch.zeros(1, 1, 2, 2, 2, 2)}, tmp_path / "r.png", columns=("input",))


def test_signal_picture_plots_each_channel_and_shades_masked_stretches(tmp_path):
    torch.manual_seed(0)
    spark = SparK(ToyEncoder(2, (4, 8), (4, 16), "batch", 1), decoder_width=8).eval()
    x = torch.randn(3, 2, 64)
    out = spark.reconstruct(x, spark.draw_mask(x, torch.Generator().manual_seed(1)))
    path = save_reconstructions(out, tmp_path / "s.png", columns=COLUMNS, padding=2)
    img = np.asarray(Image.open(path)).astype(int)
    plot_w, plot_h = 256, 80
    assert img.shape == (3 * plot_h + 4 * 2, 4 * plot_w + 5 * 2, 3)
    masked_tile = img[2 : 2 + plot_h, 2 * 2 + plot_w : 2 * 2 + 2 * plot_w]
    input_tile = img[2 : 2 + plot_h, 2 : 2 + plot_w]
    # both channels are drawn in their own colours in the input plot
    blue = (np.abs(input_tile - [31, 119, 181]).sum(-1) < 40).any()
    orange = (np.abs(input_tile - [255, 127, 12]).sum(-1) < 40).any()
    assert blue and orange
    # in the masked column a masked stretch is a plain grey band with no line through it
    visible = out["mask"][0, 0].numpy()
    hidden = np.flatnonzero(~visible)
    t = hidden[len(hidden) // 2]
    col = int(round(t * (plot_w - 1) / 63))
    assert (masked_tile[:, col] == 128).all()
    assert not (input_tile[:, col] == 128).all()
