"""save_reconstructions writes a grid picture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sparsify.errors import SparsifyError
from sparsify.spark import SparK, save_reconstructions

from .toy_encoder import ToyEncoder


@pytest.mark.parametrize("in_chans", [1, 3, 4])
def test_grid_picture(tmp_path, in_chans):
    torch.manual_seed(0)
    spark = SparK(ToyEncoder(in_chans, (8, 16), (4, 8)), decoder_width=16).eval()
    x = torch.randn(3, in_chans, 16, 24)
    out = spark.reconstruct(x)
    path = save_reconstructions(out, tmp_path / "pics" / "recon.png", padding=2)
    img = np.asarray(Image.open(path))
    assert img.shape == (3 * 16 + 4 * 2, 3 * 24 + 4 * 2, 3)
    # masked patches of the middle column are grey
    m = out["mask"][0, 0].numpy()
    tile = img[2 : 2 + 16, 2 + 24 + 2 : 2 + 2 * 24 + 2]
    assert (tile[~m] == 128).all()


def test_options(tmp_path):
    torch.manual_seed(0)
    spark = SparK(ToyEncoder(3, (8,), (4,)), decoder_width=8).eval()
    out = spark.reconstruct(torch.randn(5, 3, 8, 8))
    path = save_reconstructions(
        out,
        tmp_path / "r.png",
        columns=("input", "reconstruction"),
        max_images=2,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        padding=0,
    )
    assert np.asarray(Image.open(path)).shape == (16, 16, 3)
    with pytest.raises(SparsifyError, match="columns"):
        save_reconstructions(out, tmp_path / "r.png", columns=("input", "nope"))
    with pytest.raises(SparsifyError, match="mean/std"):
        save_reconstructions(out, tmp_path / "r.png", mean=(0.5,), std=(0.5,))
    with pytest.raises(SparsifyError, match="SparK.reconstruct"):
        save_reconstructions({"x": out["input"]}, tmp_path / "r.png")


def test_labelled_columns_add_a_header(tmp_path):
    torch.manual_seed(0)
    spark = SparK(ToyEncoder(3, (8, 16), (4, 8)), decoder_width=16).eval()
    out = spark.reconstruct(torch.randn(2, 3, 32, 32))
    cols = ("input", "masked", "reconstruction", "composite")
    plain = np.asarray(Image.open(save_reconstructions(out, tmp_path / "a.png", columns=cols)))
    labelled = np.asarray(Image.open(save_reconstructions(out, tmp_path / "b.png", columns=cols, labels=True)))
    extra = labelled.shape[0] - plain.shape[0]
    assert extra > 8 and labelled.shape[1] == plain.shape[1]
    np.testing.assert_array_equal(labelled[extra:], plain)  # the images themselves are unchanged
    header = labelled[:extra]
    for j in range(len(cols)):  # some dark text above every column
        x0 = 2 + j * (32 + 2)
        assert (header[:, x0 : x0 + 32] < 100).any(), cols[j]
    with pytest.raises(SparsifyError, match="one text per column"):
        save_reconstructions(out, tmp_path / "c.png", columns=cols, labels=["a"])
