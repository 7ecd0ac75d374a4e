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


def _export_tiny(tmp_path: Path, name: str = "exported.safetensors", model_spec: str = TINY) -> Path:
    """A backbone written by export_backbone, as pretraining writes it (header included)."""
    import sparsify

    model = build_model(model_spec)
    enc = sparsify.wrap(model, input_size=(32, 32))
    return sparsify.export_backbone(enc, tmp_path / name, model=model_spec)


def test_backbone_header_replaces_model_flags(
    labelled_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backbone = _export_tiny(tmp_path)
    out = tmp_path / "ft"
    args = ["--data", str(labelled_folder), "--init", str(backbone), "--batch-size", "4", "--workers", "0"]
    code = finetune.main([*args, "--steps", "2", "--no-tensorboard", "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert f"fine-tune of {TINY}" in stdout and "32 px" in stdout  # model and input size from the header
    assert (out / "checkpoints" / "ckpt-00000002.pt").is_file()
    # without a header, --model is required (it used to default to resnet50 silently)
    plain = tmp_path / "plain.safetensors"
    save_file({k: v for k, v in build_model(TINY).state_dict().items() if not k.startswith("fc.")}, str(plain))
    assert finetune.main([*args, "--init", str(plain), "--steps", "1", "--out", str(tmp_path / "p")]) == 2
    assert "pass --model" in capsys.readouterr().err


def test_backbone_of_a_deeper_model_is_refused(
    labelled_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    state = {k: v for k, v in build_model(TINY).state_dict().items() if not k.startswith("fc.")}
    state["stages.4.0.weight"] = torch.zeros(32, 32, 3, 3)  # one more block than the model has
    deeper = tmp_path / "deeper.safetensors"
    save_file(state, str(deeper))
    args = ["--data", str(labelled_folder), "--init", str(deeper), *COMMON, "--steps", "1"]
    assert finetune.main([*args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "tensors the model lacks" in err and "stages.4.0.weight" in err


def test_finetune_sigterm_then_resume_equals_uninterrupted(
    labelled_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import signal

    from safetensors.torch import load_file
    from sparsify.recipes import finetune_loop
    from sparsify.recipes.run_folder import RunFolder

    backbone = _export_tiny(tmp_path)
    args = [*["--data", str(labelled_folder), "--init", str(backbone), *COMMON], "--epochs", "2", "--base-lr", "0.1"]
    args += ["--drop-path", "0.1"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert finetune.main([*args, "--out", str(straight)]) == 0

    real_step = finetune_loop.Finetuner.train_step
    calls = {"n": 0}

    def step_then_sigterm(self: finetune_loop.Finetuner, batch: object, epoch: int) -> tuple[float, int]:
        calls["n"] += 1
        if calls["n"] == 4:  # in the middle of the second epoch, as a scheduler would
            signal.raise_signal(signal.SIGTERM)
        return real_step(self, batch, epoch)

    monkeypatch.setattr(finetune_loop.Finetuner, "train_step", step_then_sigterm)
    assert finetune.main([*args, "--out", str(stopped)]) == 130
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["ckpt-00000003.pt", "ckpt-00000004.pt"]
    monkeypatch.undo()
    with RunFolder(stopped):  # while a run holds the folder, a second one is refused
        assert finetune.main([*args, "--out", str(stopped)]) == 2
    assert "another run is using" in capsys.readouterr().err
    assert finetune.main([*args, "--out", str(stopped)]) == 0
    assert "at step 4" in capsys.readouterr().out
    a, b = load_file(str(straight / "final.safetensors")), load_file(str(stopped / "final.safetensors"))
    assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)
    assert not torch_equal(a["stages.0.0.weight"], load_file(str(backbone))["stages.0.0.weight"])  # it did train
    ma, mb = metrics(straight), metrics(stopped)
    assert [r["step"] for r in mb] == [1, 2]
    for ra, rb in zip(ma, mb):
        assert ra["top1"] == rb["top1"] and ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-6)


def torch_equal(a: object, b: object) -> bool:
    import torch

    return bool(torch.equal(a, b))  # type: ignore[arg-type]


# Fine-tunes, and SIGKILLs itself at its fifth step (after the epoch-end checkpoint of step 3).
_KILL_SCRIPT = """
import os, signal, sys
from sparsify.recipes import finetune, finetune_loop
real = finetune_loop.Finetuner.train_step
calls = {"n": 0}
def step(self, batch, epoch):
    calls["n"] += 1
    if calls["n"] == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, batch, epoch)
finetune_loop.Finetuner.train_step = step
sys.exit(finetune.main(sys.argv[1:]))
"""


def test_finetune_sigkill_then_resume_equals_uninterrupted(
    labelled_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import subprocess
    import sys

    from safetensors.torch import load_file

    backbone = _export_tiny(tmp_path)
    args = [*["--data", str(labelled_folder), "--init", str(backbone), *COMMON], "--epochs", "2", "--base-lr", "0.1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert finetune.main([*args, "--out", str(straight)]) == 0
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, *args, "--out", str(killed)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == -9, proc.stderr
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["ckpt-00000003.pt"]
    capsys.readouterr()
    assert finetune.main([*args, "--out", str(killed)]) == 0  # the dead run's lock is gone
    assert "at step 3" in capsys.readouterr().out
    a, b = load_file(str(straight / "final.safetensors")), load_file(str(killed / "final.safetensors"))
    assert all(torch_equal(a[k], b[k]) for k in a)
    assert [r["top1"] for r in metrics(straight)] == [r["top1"] for r in metrics(killed)]
