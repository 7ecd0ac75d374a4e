"""Monitoring during pretraining: the k-NN monitor, labelled reconstruction pictures, batch planning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _recipe_helpers import TINY, metrics
from PIL import Image
from sparsify.recipes import pretrain

FAST = ["--model", TINY, "--input-size", "32", "--decoder-width", "16", "--workers", "0", "--vis-images", "2"]


def test_knn_monitor_pictures_and_header(image_folder: Path, labelled_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = ["--data", str(image_folder), *FAST, "--batch-size", "4", "--steps", "4", "--knn-data",
            str(labelled_folder), "--knn-every", "2", "--knn-k", "3", "--tensorboard", "--out", str(out)]  # fmt: skip
    assert pretrain.main(args) == 0
    stdout = capsys.readouterr().out
    knn = [(r["step"], r["knn_top1"]) for r in metrics(out) if "knn_top1" in r]
    assert [s for s, _ in knn] == [0, 2, 4]
    assert all(0.0 <= a <= 1.0 for _, a in knn)
    assert "k-NN top-1 (16 images, 2 classes, leave-one-out)" in stdout and "at step 0 ->" in stdout
    assert "checkpoints: ~" in stdout and "keeping 2" in stdout
    assert "peak lr" in stdout and "sqrt(4/256)" in stdout  # the default preset's rule, stated
    # labelled pictures: a header row above 2 rows of 32 px tiles, 4 columns
    for name in ("recon_start.png", "recon_end.png", "recon_latest.png"):
        img = np.asarray(Image.open(out / name))
        assert img.shape[1] == 4 * 32 + 5 * 2 and img.shape[0] > 2 * 32 + 3 * 2 + 8, name
    assert any(p.name.startswith("events") for p in (out / "tensorboard").iterdir())


def test_knn_interval_is_measured_when_not_given(image_folder: Path, labelled_folder: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    args = ["--data", str(image_folder), *FAST, "--batch-size", "4", "--steps", "12", "--knn-data",
            str(labelled_folder), "--no-tensorboard", "--out", str(out)]  # fmt: skip
    assert pretrain.main(args) == 0
    stdout = capsys.readouterr().out
    assert "steps (< 2% of training time)" in stdout
    knn = [r["step"] for r in metrics(out) if "knn_top1" in r]
    assert knn[0] == 0 and knn[-1] == 12


@pytest.mark.parametrize(
    ("extra", "batch", "accum", "text"),
    [
        ([], 13, 1, "batch 13,"),  # default preset: one micro-batch, at most the dataset (13 files)
        (["--batch-size", "8", "--micro-batch", "4"], 8, 2, "batch 8 (4 x 2 accumulated micro-steps)"),
        (["--batch-size", "8", "--accum", "4"], 8, 4, "batch 8 (2 x 4 accumulated micro-steps)"),
        (["--batch-size", "6", "--micro-batch", "4"], 6, 2, "batch 6 (3 x 2 accumulated micro-steps)"),
    ],
)
def test_batch_plan(image_folder: Path, tmp_path: Path, capsys, extra, batch, accum, text) -> None:
    out = tmp_path / "run"
    args = ["--data", str(image_folder), *FAST, *extra, "--steps", "1", "--vis-images", "0", "--no-tensorboard",
            "--out", str(out)]  # fmt: skip
    assert pretrain.main(args) == 0
    stdout = capsys.readouterr().out
    assert text in stdout
    import json

    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["batch_size"], cfg["accum"]) == (batch, accum)
