"""Divergence is recovered, not only reported (issue 18, part 1).

The scenario of the issue (a far too high learning rate) is run for real: the run stops, names only a
checkpoint whose own weights gave a healthy loss, and the printed advice alone (or ``--on-divergence
rollback`` by itself) leads to a run that finishes with finite losses.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from _recipe_helpers import FAST_PRETRAIN, losses, metrics, run_pretrain
from sparsify.recipes import checkpoint as ckpt
from sparsify.recipes import pretrain
from sparsify.recipes.divergence import LossHealth

FAST = FAST_PRETRAIN + ["--vis-images", "0", "--base-lr", "0.05"]
ADVICE = re.compile(r"run the same command with (--lr \S+) to (resume from it|start over)")


def _steps(out: Path) -> list[int]:
    return [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")]


def _finite_checkpoints(out: Path) -> bool:
    for _, path in ckpt.list_checkpoints(out / "checkpoints"):
        state = torch.load(path, weights_only=True)
        if ckpt.nonfinite_entries(state["model"]) or ckpt.nonfinite_entries(state["optimizer"]):
            return False
    return True


def _advice(stderr: str) -> list[str]:
    found = ADVICE.search(stderr)
    assert found, stderr
    flag, value = found.group(1).split()
    return [flag, value]


def test_health_rule() -> None:
    health = LossHealth(4.0)
    assert health.problem(1e30) is None  # no history yet: any finite loss
    assert health.problem(float("nan")) == "non-finite loss" and health.problem(float("inf")) == "non-finite loss"
    for v in (1.0, 0.9, 0.8, 50.0):  # one outlier in the history does not move the median much
        health.record(v)
    assert health.problem(3.5) is None and health.problem(3.79) is None  # 4 x median(1.0, 0.9, 0.8, 50) = 3.8
    assert "loss spike" in (health.problem(3.81) or "")
    for _ in range(100):  # only the last 20 count
        health.record(0.1)
    assert health.problem(0.41) is not None and health.problem(0.39) is None
    assert LossHealth(0.0, [1.0]).problem(1e9) is None  # spike test off


def test_issue_scenario_far_too_high_lr_then_the_printed_advice(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    cmd = ["--data", str(image_folder), *FAST, "--steps", "8", "--opt", "sgd", "--save-every", "1", "--out", str(out)]
    code, _, stderr = run_pretrain([*cmd, "--lr", "1e6"], capsys)
    assert code == 1, stderr
    assert "loss spike" in stderr and "stopping" in stderr
    # Step 1's weights already gave an exploded (finite) loss at step 2: that checkpoint is not good, none was written.
    assert "not saving the checkpoint of step 1" in stderr and _steps(out) == []
    assert "No good checkpoint was written yet" in stderr
    code, stdout, stderr = run_pretrain([*cmd, *_advice(stderr)], capsys)
    assert code == 0, stderr
    assert ", sgd, wd " in stdout  # the header names no betas for an optimiser that takes none
    got = losses(out)
    assert sorted(got) == list(range(1, 9)) and all(math.isfinite(v) for v in got.values())
    assert _finite_checkpoints(out) and _steps(out)[-1] == 8


def test_diverged_run_names_the_last_good_checkpoint_and_resumes_from_it(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    base = ["--data", str(image_folder), *FAST, "--save-every", "2", "--keep", "0", "--out", str(out)]
    assert run_pretrain([*base, "--steps", "4"], capsys)[0] == 0
    before = losses(out)

    code, stdout, stderr = run_pretrain([*base, "--steps", "10", "--lr", "1e6"], capsys)
    assert code == 1 and "resuming from" in stdout and "at step 4" in stdout
    assert "The last good checkpoint is " in stderr and "ckpt-00000004.pt" in stderr
    assert _steps(out) == [2, 4]  # nothing written after the step-5 update exploded the weights

    code, stdout, stderr = run_pretrain([*base, "--steps", "10", *_advice(stderr)], capsys)
    assert code == 0, stderr
    assert "at step 4" in stdout  # resumed from the good checkpoint, by default (--resume auto)
    got = losses(out)
    assert {s: got[s] for s in before} == before
    assert all(math.isfinite(got[s]) for s in range(1, 11))
    assert _steps(out)[-1] == 10 and _finite_checkpoints(out)


def test_rollback_recovers_by_itself(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    base = ["--data", str(image_folder), *FAST, "--save-every", "2", "--keep", "0", "--out", str(out)]
    assert run_pretrain([*base, "--steps", "4"], capsys)[0] == 0
    roll = ["--on-divergence", "rollback", "--rollback-lr-factor", "1e-6", "--max-bad-steps", "2"]
    code, _, stderr = run_pretrain([*base, "--steps", "12", "--lr", "1e6", *roll], capsys)
    assert code == 0, stderr
    assert "diverged: rollback 1/3 to" in stderr and "ckpt-00000004.pt" in stderr
    rows = metrics(out)
    rollbacks = [r for r in rows if "rollback" in r]
    assert rollbacks and rollbacks[0]["rollback_to"] == 4 and rollbacks[0]["lr_scale"] == pytest.approx(1e-6)
    assert rows[-1]["step"] == 12 and math.isfinite(rows[-1]["loss"])
    assert _finite_checkpoints(out) and _steps(out)[-1] == 12
    last = torch.load(out / "checkpoints" / "ckpt-00000012.pt", weights_only=True)
    assert last["rollbacks"] >= 1 and last["lr_scale"] == pytest.approx(1e-6 ** last["rollbacks"])


def test_rollback_gives_up_after_max_rollbacks(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every step after the fourth spikes, whatever the weights: each rollback is followed by divergence again.
    real_step = pretrain.Pretrainer.train_step
    calls = {"n": 0}

    def spiking(self: pretrain.Pretrainer, model: torch.nn.Module, it: object) -> tuple[torch.Tensor, int]:
        loss, images = real_step(self, model, it)
        calls["n"] += 1
        return (loss * 1e6 if calls["n"] > 4 else loss), images

    monkeypatch.setattr(pretrain.Pretrainer, "train_step", spiking)
    out = tmp_path / "run"
    args = ["--data", str(image_folder), *FAST, "--steps", "30", "--save-every", "2", "--out", str(out)]
    roll = ["--on-divergence", "rollback", "--max-bad-steps", "2", "--max-rollbacks", "2"]
    code, _, stderr = run_pretrain([*args, *roll], capsys)
    assert code == 1
    assert "rollback 1/2" in stderr and "rollback 2/2" in stderr
    assert "not healthy (a spike or not finite) after 2 rollback(s) for 2 steps in a row" in stderr
    # step 4's checkpoint was judged by step 5's spiking loss and dropped; step 2's is the good one
    assert _steps(out) == [2] and "ckpt-00000002.pt" in stderr
    assert [r["rollback_to"] for r in metrics(out) if "rollback" in r] == [2, 2]
