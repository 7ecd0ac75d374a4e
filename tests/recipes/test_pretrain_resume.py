"""A run killed with SIGKILL (here: in the middle of writing a checkpoint) and resumed gives exactly the
losses of an uninterrupted run with the same seed (CPU): data order, augmentation, masks, drop path,
optimiser and BatchNorm state are all restored."""

from __future__ import annotations

from pathlib import Path

import pytest
from _recipe_helpers import TINY, losses, run_killed
from sparsify.recipes import pretrain
from sparsify.recipes.checkpoint import list_checkpoints

ARGS = [
    "--model",
    TINY,
    "--input-size",
    "32",
    "--batch-size",
    "4",
    "--decoder-width",
    "32",
    "--steps",
    "10",
    "--save-every",
    "2",
    "--base-lr",
    "0.2",
    "--warmup-steps",
    "2",
    "--drop-path",
    "0.1",
    "--vis-images",
    "0",
    "--no-tensorboard",
    "--seed",
    "3",
]

def test_sigkill_then_resume_equals_uninterrupted(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data", str(image_folder)]
    straight = tmp_path / "straight"
    assert pretrain.main([*data, *ARGS, "--workers", "0", "--out", str(straight)]) == 0

    killed = tmp_path / "killed"
    proc = run_killed([*data, *ARGS, "--workers", "0", "--out", str(killed)], tmp_path)  # dies writing step 6
    assert proc.returncode == -9, proc.stderr
    assert [s for s, _ in list_checkpoints(killed / "checkpoints")] == [2, 4]  # the torn step-6 write is not one
    assert max(losses(killed)) == 6  # it had logged up to step 6 when it died

    # resume with data-loader workers this time: the batches must not depend on them
    capsys.readouterr()
    assert pretrain.main([*data, *ARGS, "--workers", "2", "--out", str(killed)]) == 0
    assert "at step 4" in capsys.readouterr().out
    a, b = losses(straight), losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-7), step
    assert not list((killed / "checkpoints").glob(".*tmp*"))  # the torn temporary file was cleaned up
