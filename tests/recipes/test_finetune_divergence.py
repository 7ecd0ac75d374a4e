"""sparsify-finetune skips and restores a non-finite step, like pretraining (issue 18, part 1)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _recipe_helpers import TINY, metrics
from safetensors.torch import load_file
from sparsify.recipes import checkpoint as ckpt
from sparsify.recipes import finetune, finetune_loop

ARGS = ["--model", TINY, "--input-size", "32", "--batch-size", "4", "--workers", "0", "--no-tensorboard",
        "--warmup", "0", "--lr", "0.02", "--save-every", "1", "--keep", "0"]  # fmt: skip


def _poison(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int] | None, after: int | None = None) -> None:
    """Put a NaN pixel into the batches of the given train_step calls (or of every call after ``after``)."""
    real = finetune_loop.Finetuner.train_step
    calls = {"n": 0}

    def step(self: finetune_loop.Finetuner, batch: tuple, epoch: int) -> tuple[float, int, str | None]:
        calls["n"] += 1
        if (bad_calls and calls["n"] in bad_calls) or (after is not None and calls["n"] > after):
            x, y, skipped = batch
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
            batch = (x, y, skipped)
        return real(self, batch, epoch)

    monkeypatch.setattr(finetune_loop.Finetuner, "train_step", step)


def test_nonfinite_step_is_skipped_and_batchnorm_restored(
    labelled_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _poison(monkeypatch, {2})
    out = tmp_path / "ft"
    code = finetune.main(["--data", str(labelled_folder), *ARGS, "--epochs", "2", "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "non-finite loss at step 2; skipped this update and restored the BatchNorm statistics" in stderr
    final = load_file(str(out / "final.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())  # running stats too
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in metrics(out))
    # no checkpoint during a bad step (as in pretraining); the NaN never reached the running statistics
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [1, 3, 4, 5, 6]
    assert not ckpt.nonfinite_entries(torch.load(out / "checkpoints" / "ckpt-00000003.pt", weights_only=True))


def test_nonfinite_streak_stops_naming_the_checkpoint_and_a_lower_lr(
    labelled_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _poison(monkeypatch, None, after=2)
    out = tmp_path / "ft"
    args = ["--data", str(labelled_folder), *ARGS, "--epochs", "4", "--max-bad-steps", "3", "--out", str(out)]
    code = finetune.main(args)
    _, stderr = capsys.readouterr()
    assert code == 1
    assert "the loss was not finite for 3 steps in a row (steps 3-5); stopping" in stderr
    assert "ckpt-00000002.pt" in stderr and "peak is 0.02; e.g. --lr 0.002" in stderr, stderr
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [1, 2]
    monkeypatch.undo()
    assert finetune.main(args) == 0  # the same command resumes from step 2 and finishes
    assert "at step 2" in capsys.readouterr().out
