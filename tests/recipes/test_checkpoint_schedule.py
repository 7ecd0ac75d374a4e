"""Checkpoints by time as well as by steps, and a header that says what fills them (issue 19, item 5)."""

from __future__ import annotations

from pathlib import Path

from _recipe_helpers import FAST_PRETRAIN, run_pretrain
from sparsify.recipes.checkpoint import list_checkpoints


def _steps(out: Path) -> list[int]:
    return [step for step, _ in list_checkpoints(out / "checkpoints")]


def test_time_interval_checkpoints_and_the_header(image_folder: Path, tmp_path: Path, capsys) -> None:
    common = ["--data", str(image_folder), *FAST_PRETRAIN, "--steps", "3", "--save-every", "1000", "--keep", "0",
              "--vis-images", "0"]  # fmt: skip
    # the default: every 10 minutes as well, said in the header; a 3-step run saves at its end only
    code, stdout, err = run_pretrain([*common, "--out", str(tmp_path / "default")], capsys)
    assert code == 0, err
    assert "every 1000 steps and every 10 minutes" in stdout
    assert "parameters of your model and" in stdout and "of SparK's decoder and densify layers" in stdout
    assert "(decoder width 32; --decoder-width sets it)" in stdout
    assert _steps(tmp_path / "default") == [3]
    # a due time interval saves at the next step, whatever the step interval says
    code, stdout, err = run_pretrain([*common, "--save-minutes", "1e-9", "--out", str(tmp_path / "often")], capsys)
    assert code == 0, err
    assert _steps(tmp_path / "often") == [1, 2, 3]
    code, stdout, err = run_pretrain([*common, "--save-minutes", "0", "--out", str(tmp_path / "off")], capsys)
    assert code == 0, err
    assert "every 1000 steps," in stdout and _steps(tmp_path / "off") == [3]


def test_fine_tuning_saves_by_time_too(labelled_folder: Path, tmp_path: Path, capsys) -> None:
    from _recipe_helpers import TINY
    from sparsify.recipes import finetune

    common = ["--data", str(labelled_folder), "--model", TINY, "--input-size", "32", "--batch-size", "4",
              "--workers", "0", "--no-tensorboard", "--steps", "3", "--save-every", "1000", "--keep", "0"]  # fmt: skip
    assert finetune.main([*common, "--out", str(tmp_path / "default")]) == 0
    assert "checkpoints every 1000 steps and every 10 minutes" in capsys.readouterr().out
    assert _steps(tmp_path / "default") == [3]
    assert finetune.main([*common, "--save-minutes", "1e-9", "--out", str(tmp_path / "often")]) == 0
    assert _steps(tmp_path / "often") == [1, 2, 3]
