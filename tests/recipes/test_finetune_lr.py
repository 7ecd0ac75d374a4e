"""sparsify-finetune's learning-rate rule: square-root scaling with a floor, stated in the header (issue 19)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from _recipe_helpers import TINY
from safetensors.torch import save_file
from sparsify.recipes import finetune
from sparsify.recipes.models import build_model


@pytest.fixture
def backbone(tmp_path: Path) -> Path:
    path = tmp_path / "backbone.safetensors"
    save_file({k: v for k, v in build_model(TINY).state_dict().items() if not k.startswith("fc.")}, str(path))
    return path


@pytest.mark.parametrize(
    ("extra", "peak", "rule"),
    [
        ([], 1e-3 * math.sqrt(4 / 256), "max(0.001 x sqrt(4/256), 0.0001)"),
        (["--lr-rule", "linear"], 1e-4, "max(0.001 x 4/256, 0.0001)"),  # 1.6e-5 raised to the floor
        (["--lr-rule", "linear", "--min-lr", "0"], 1e-3 * 4 / 256, "max(0.001 x 4/256, 0)"),
        (["--linear-probe"], 0.1 * math.sqrt(4 / 256), "max(0.1 x sqrt(4/256), 0.01)"),
        (["--lr", "0.02"], 0.02, "set by --lr"),
    ],
)
def test_peak_lr_rule_in_the_header(labelled_folder, backbone, tmp_path, capsys, extra, peak, rule) -> None:
    args = ["--data", str(labelled_folder), "--init", str(backbone), "--model", TINY, "--input-size", "32",
            "--batch-size", "4", "--workers", "0", "--no-tensorboard", "--steps", "1", "--out", str(tmp_path / "ft"),
            *extra]  # fmt: skip
    assert finetune.main(args) == 0
    stdout = capsys.readouterr().out
    assert f"peak lr {peak:.3g} ({rule})" in stdout, stdout


def test_runs_saved_before_the_rule_keep_the_linear_one() -> None:
    saved = {"model": TINY, "batch_size": 8, "base_lr": None}
    assert finetune.resolve_settings({}, saved)["lr_rule"] == "linear"
    assert finetune.resolve_settings({}, {**saved, "lr_rule": "sqrt"})["lr_rule"] == "sqrt"
    assert finetune.resolve_settings({"lr_rule": "sqrt"}, saved)["lr_rule"] == "sqrt"
    assert finetune.resolve_settings({})["lr_rule"] == "sqrt"
