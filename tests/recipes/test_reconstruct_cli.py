"""sparsify-reconstruct: a labelled grid from a run folder or checkpoint, fixed mask seed, clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from _recipe_helpers import TINY
from PIL import Image
from sparsify.recipes import pretrain, reconstruct


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from _recipe_helpers import make_image_folder

    root = tmp_path_factory.mktemp("recon")
    data = make_image_folder(root / "images", n=8, corrupt=0, size=(40, 52))
    out = root / "run"
    args = ["--data", str(data), "--model", TINY, "--input-size", "32", "--batch-size", "4", "--decoder-width",
            "16", "--steps", "2", "--vis-images", "0", "--no-tensorboard", "--out", str(out)]  # fmt: skip
    assert pretrain.main(args) == 0
    return out


def test_grid_from_run_folder_uses_its_data_and_is_reproducible(run_folder, tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert reconstruct.main([str(run_folder), "--out", str(a), "--max-images", "3"]) == 0
    assert "-> " + str(a) in capsys.readouterr().out
    ckpt = sorted((run_folder / "checkpoints").glob("ckpt-*.pt"))[-1]
    assert reconstruct.main([str(ckpt), "--out", str(b), "--max-images", "3"]) == 0
    img = np.asarray(Image.open(a))
    # 3 rows of 32 px tiles under a header, 4 columns of 32 px (2 px padding)
    assert img.shape[1] == 4 * 32 + 5 * 2
    assert img.shape[0] > 3 * 32 + 4 * 2
    np.testing.assert_array_equal(img, np.asarray(Image.open(b)))  # same checkpoint, same seed, same picture


def test_seed_changes_the_mask_and_images_can_be_given(run_folder, tmp_path):
    pics = sorted((run_folder.parent / "images").rglob("*.png"))[:2]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert reconstruct.main([str(run_folder), *map(str, pics), "--out", str(a), "--seed", "0"]) == 0
    assert reconstruct.main([str(run_folder), *map(str, pics), "--out", str(b), "--seed", "1"]) == 0
    ia, ib = np.asarray(Image.open(a)), np.asarray(Image.open(b))
    assert ia.shape == ib.shape and ia.shape[0] > 2 * 32
    assert not np.array_equal(ia, ib)


@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/run"], "neither a run folder nor a checkpoint"),
        (["{run}", "/no/such/image.png"], "no such image file or folder"),
        (["{run}", "--max-images", "0"], "--max-images must be >= 1"),
        (["{run}", "--mask-ratio", "1.5"], "--mask-ratio must be in (0, 1)"),
        (["{run}", "--input-size", "40"], "not a multiple of the model's patch size"),
    ],
)
def test_clear_errors(run_folder, tmp_path, capsys, args, message):
    args = [a.replace("{run}", str(run_folder)) for a in args]
    assert reconstruct.main([*args, "--out", str(tmp_path / "x.png")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("form", ["file", "module"])
def test_relative_factory_is_found_from_another_directory(tmp_path, monkeypatch, form):
    """A run started in its project folder with ``--model nets.py:fn`` (or ``nets:fn``) reconstructs from anywhere."""
    from _recipe_helpers import make_image_folder

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    module = f"nets_{form}_{tmp_path.name}"  # a fresh module name: nothing cached in sys.modules
    source = Path(TINY.rpartition(":")[0]).read_text()
    (project / f"{module}.py").write_text(source)
    data = make_image_folder(tmp_path / "images", n=4, corrupt=0, size=(40, 52))
    spec = f"{module}.py:tiny_cnn" if form == "file" else f"{module}:tiny_cnn"
    monkeypatch.chdir(project)
    args = ["--data", str(data), "--model", spec, "--input-size", "32", "--batch-size", "4", "--decoder-width",
            "16", "--steps", "1", "--vis-images", "0", "--no-tensorboard", "--out", str(tmp_path / "run")]  # fmt: skip
    assert pretrain.main(args) == 0
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(project))])
    monkeypatch.delitem(sys.modules, module, raising=False)  # imported by the run above, in this process
    png = tmp_path / "grid.png"
    assert reconstruct.main([str(tmp_path / "run"), "--out", str(png), "--max-images", "2"]) == 0
    assert png.is_file()
