"""sparsify-finetune: fine-tuning and linear probing from an exported backbone on a tiny labelled folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from _recipe_helpers import TINY, metrics
from safetensors.torch import save_file
from sparsify.recipes import finetune
from sparsify.recipes.models import build_model


@pytest.fixture
def backbone(tmp_path: Path) -> Path:
    model = build_model(TINY)
    path = tmp_path / "backbone.safetensors"
    save_file({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}, str(path))
    return path


COMMON = [
    "--model",
    TINY,
    "--input-size",
    "32",
    "--batch-size",
    "4",
    "--workers",
    "0",
    "--no-tensorboard",
    "--warmup",
    "0",
]


def test_finetune_reports_accuracy_per_epoch(
    labelled_folder: Path, backbone: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ft"
    code = finetune.main(
        [
            "--data",
            str(labelled_folder),
            "--init",
            str(backbone),
            *COMMON,
            "--epochs",
            "3",
            "--base-lr",
            "0.3",
            "--out",
            str(out),
        ]
    )
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "newly initialised: fc.weight, fc.bias" in stdout
    assert stdout.count("top-1") >= 3 and "best top-1" in stdout
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0.0 <= r["top1"] <= 100.0 for r in rows)
    assert (out / "final.safetensors").is_file() and (out / "best.safetensors").is_file()


def test_linear_probe_freezes_the_backbone(
    labelled_folder: Path, backbone: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "lp"
    code = finetune.main(
        [
            "--data",
            str(labelled_folder),
            "--init",
            str(backbone),
            *COMMON,
            "--epochs",
            "2",
            "--linear-probe",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    before, after = load_file(str(backbone)), load_file(str(out / "final.safetensors"))
    for k, v in before.items():
        assert after[k].equal(v), k  # weights and BatchNorm statistics untouched
    assert "linear probe" in capsys.readouterr().out


def test_finetune_errors(labelled_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v for k, v in build_model("resnet18").state_dict().items() if not k.startswith("fc.")}, str(wrong))
    code = finetune.main(
        ["--data", str(labelled_folder), "--init", str(wrong), *COMMON, "--epochs", "1", "--out", str(tmp_path / "x")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "another architecture" in err and "Traceback" not in err
    assert finetune.main(["--data", str(tmp_path / "nope"), *COMMON]) == 2
    assert "does not exist" in capsys.readouterr().err
