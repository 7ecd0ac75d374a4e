"""The k-NN monitor during pretraining measures learning: no gain without it, a gain with it (issue 19)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _recipe_helpers import (
    FAST_PRETRAIN,
    make_image_folder,
    make_labelled_folder,
    make_photo_crops,
    metrics,
    run_pretrain,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("monitor")
    return make_image_folder(root / "images", n=16, corrupt=0), make_photo_crops(root / "labelled")


def _knn(folders, out: Path, capsys, *extra: str) -> list[tuple[int, float]]:
    images, labelled = folders
    args = ["--data", str(images), *FAST_PRETRAIN, "--batch-size", "8", "--steps", "16", "--knn-every", "8",
            "--knn-data", str(labelled), "--vis-images", "0", "--out", str(out), *extra]  # fmt: skip
    code, _, err = run_pretrain(args, capsys)
    assert code == 0, err
    return [(r["step"], r["knn_top1"]) for r in metrics(out) if "knn_top1" in r]


def test_no_learning_no_gain_and_learning_moves_the_score(folders, tmp_path: Path, capsys) -> None:
    # lr 1e-12: the weights stay put while BatchNorm's running statistics move with every step. Scored
    # with those statistics, this run "gained" 27.8 points (44.4% -> 72.2%); now the gain is zero.
    frozen = _knn(folders, tmp_path / "frozen", capsys, "--lr", "1e-12")
    assert [s for s, _ in frozen] == [0, 8, 16]
    one_image = 1 / 36 + 1e-9  # "within noise": a tie may tip one vote of 36
    assert all(abs(acc - frozen[0][1]) <= one_image for _, acc in frozen)
    # a real learning rate on the same data: the score is free to move (measured: 75.0% -> 80.6%)
    learning = _knn(folders, tmp_path / "learning", capsys, "--lr", "3e-2")
    assert learning[0][1] == frozen[0][1]  # the same weights at step 0 get the same score
    assert len({acc for _, acc in learning}) > 1, learning


def test_measured_interval_is_kept_as_announced(folders, tmp_path: Path, capsys) -> None:
    images, labelled = folders[0], make_labelled_folder(tmp_path / "labelled", per_class=4)
    out = tmp_path / "run"
    args = ["--data", str(images), *FAST_PRETRAIN, "--steps", "24", "--knn-data", str(labelled),
            "--vis-images", "0", "--out", str(out)]  # fmt: skip
    code, stdout, err = run_pretrain(args, capsys)
    assert code == 0, err
    found = re.search(r"evaluating at step (\d+), then every (\d+) steps", stdout)
    assert found, stdout
    first, every = int(found[1]), int(found[2])
    assert first > 10 or first % every == 0  # announced after the 10 steps that measure a step's cost
    expected = sorted({0, 24} | set(range(first, 25, every)))
    assert [r["step"] for r in metrics(out) if "knn_top1" in r] == expected


def test_a_run_that_fails_before_its_first_step_leaves_no_folder(tmp_path: Path, capsys) -> None:
    images = make_image_folder(tmp_path / "images", n=4, corrupt=0)
    runs = tmp_path / "runs"
    flags = list(FAST_PRETRAIN)
    flags[flags.index("--input-size") + 1] = "60"  # not a multiple of the tiny CNN's total stride 16
    code, _, err = run_pretrain(["--data", str(images), *flags, "--steps", "1", "--out", str(runs / "r")], capsys)
    assert code == 2 and "error:" in err
    assert not runs.exists()  # neither the run folder (with its .lock) nor the parent it created
    # a folder that existed before is the user's: kept, with nothing of the failed run but the lock file
    (runs / "mine").mkdir(parents=True)
    (runs / "mine" / "notes.txt").write_text("keep me")
    code, _, _ = run_pretrain(["--data", str(images), *flags, "--steps", "1", "--out", str(runs / "mine")], capsys)
    assert code == 2 and (runs / "mine" / "notes.txt").read_text() == "keep me"


def test_the_librarys_size_message_reaches_the_command_line(tmp_path: Path, capsys, monkeypatch) -> None:
    """The library checks a size against the network's total stride first; the recipe shows that message."""
    import sparsify
    from sparsify.errors import SparsifyError

    said = ("input_size 60x60 is not a multiple of TinyCNN's downsample ratio 16 (the stride of its last "
            "stage, which is also the mask patch size); use e.g. 48x48 or 64x64")  # fmt: skip

    def refuse(model, input_size, **kwargs):
        assert tuple(input_size) == (60, 60)
        raise SparsifyError(said)

    monkeypatch.setattr(sparsify, "wrap", refuse)
    images = make_image_folder(tmp_path / "images", n=4, corrupt=0)
    flags = list(FAST_PRETRAIN)
    flags[flags.index("--input-size") + 1] = "60"
    code, _, err = run_pretrain(["--data", str(images), *flags, "--steps", "1", "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    assert err.strip() == "sparsify-pretrain: error: " + said.replace("input_size", "--input-size")
    assert not (tmp_path / "r").exists()
