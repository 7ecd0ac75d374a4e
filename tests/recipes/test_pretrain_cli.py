"""sparsify-pretrain end to end on tiny data: outputs, resume, clear errors, non-finite losses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _recipe_helpers import FAST_PRETRAIN, TINY, losses, run_pretrain
from sparsify.recipes import pretrain
from sparsify.recipes.checkpoint import list_checkpoints

FAST = FAST_PRETRAIN + ["--vis-images", "4"]
run = run_pretrain


def test_end_to_end_with_corrupt_file_then_resume(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = [
        "--data",
        str(image_folder),
        *FAST,
        "--steps",
        "6",
        "--save-every",
        "3",
        "--base-lr",
        "0.05",
        "--out",
        str(out),
        "--tensorboard",
    ]
    code, stdout, stderr = run(args, capsys)
    assert code == 0, stderr
    for name in (
        "backbone.safetensors",
        "metrics.jsonl",
        "recon_start.png",
        "recon_end.png",
        "loss_curve.png",
        "config.json",
    ):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [3, 6]
    assert "skipped unreadable image" in stderr and "broken0.jpg" in stderr
    assert "skipped 1 unreadable image file(s)" in stdout
    assert "loss: first" in stdout and "outputs in" in stdout
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    # the exported backbone loads strictly (minus the head) into a fresh model
    from safetensors.torch import load_file
    from sparsify.recipes.models import build_model

    fresh = build_model(TINY)
    result = fresh.load_state_dict(load_file(str(out / "backbone.safetensors")), strict=False)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and not result.unexpected_keys

    # the same command again: the run is complete, nothing is redone
    code, stdout, _ = run(args, capsys)
    assert code == 0 and "already complete" in stdout
    # continue it to 9 steps: resumes from step 6, keeps the first six rows
    code, stdout, stderr = run(
        [*args[: args.index("--steps")], "--steps", "9", *args[args.index("--steps") + 2 :]], capsys
    )
    assert code == 0, stderr
    assert "resuming from" in stdout and "at step 6" in stdout
    assert sorted(losses(out)) == list(range(1, 10))
    assert [s for s, _ in list_checkpoints(out / "checkpoints")][-1] == 9


def test_embedded_default_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, stderr = run([*FAST, "--steps", "2", "--out", str(tmp_path / "demo")], capsys)
    assert code == 0, stderr
    assert "sample photographs" in stdout and "no --data" in stdout
    assert (tmp_path / "demo" / "backbone.safetensors").is_file()


def test_default_out_and_presets() -> None:
    cfg = pretrain.resolve_config({})
    assert cfg.preset == "demo" and cfg.out == str(Path("runs") / "resnet18-samples")
    paper = pretrain.resolve_config({"data": "/some/photos", "preset": "paper"})
    assert (paper.model, paper.input_size, paper.batch_size, paper.epochs) == ("resnet50", (224, 224), 4096, 1600)
    assert (paper.base_lr, paper.warmup, paper.decoder_width, paper.crop_scale) == (2e-4, 40.0, 768, (0.67, 1.0))
    assert (paper.weight_decay, paper.weight_decay_end, paper.clip_grad, paper.opt) == (0.04, 0.2, 5.0, "lamb")
    assert paper.lr_rule == "linear" and paper.micro_batch is None and paper.accum is None
    assert paper.out == str(Path("runs") / "resnet50-photos")
    # with --data and no preset: the paper's recipe at the batch that fits, lr square-root scaled
    own = pretrain.resolve_config({"data": "/some/photos"})
    assert own.preset == "default" and own.batch_size is None and own.lr_rule == "sqrt" and own.base_lr == 8e-4
    assert (own.model, own.input_size, own.epochs, own.warmup, own.decoder_width) == (
        "resnet50", (224, 224), 1600, 40.0, 768
    )  # fmt: skip
    assert own.keep == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "MISSING"], "does not exist"),
        (["--data", "EMPTY"], "no images found"),
        (["--model", "resnet5O"], "did you mean"),
        (["--model", "no_such_pkg_xyz:make"], "cannot import module"),
        (["--input-size", "40"], "not a multiple"),
        (["--input-size", "big"], "input size must be"),
        (["--batch-size", "64"], "larger than the dataset"),
        (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA"),
    ],
)
def test_user_errors_exit_2_without_traceback(
    extra: list[str], message: str, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    extra = [
        str(tmp_path / "missing") if e == "MISSING" else str(tmp_path / "empty") if e == "EMPTY" else e for e in extra
    ]
    args = [*FAST, "--data", str(image_folder), "--steps", "1", "--out", str(tmp_path / "r"), *extra]
    code, _, stderr = run(args, capsys)
    assert code == 2
    assert message in stderr and "Traceback" not in stderr
    assert stderr.strip().startswith("sparsify-pretrain: error:")


def test_console_script_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sparsify.recipes.pretrain", "--data", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_nonfinite_losses_stop_and_keep_last_good_checkpoint(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_step = pretrain.Pretrainer.train_step
    calls = {"n": 0}

    def poisoned(self: pretrain.Pretrainer, model: torch.nn.Module, it: object) -> tuple[float, int]:
        loss, images = real_step(self, model, it)
        calls["n"] += 1
        return (float("nan") if calls["n"] >= 3 else loss), images

    monkeypatch.setattr(pretrain.Pretrainer, "train_step", poisoned)
    out = tmp_path / "nan"
    code, _, stderr = run(
        [
            "--data",
            str(image_folder),
            *FAST,
            "--steps",
            "20",
            "--save-every",
            "2",
            "--max-bad-steps",
            "3",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 1
    assert "non-finite loss at step 3" in stderr
    assert "not finite for 3 steps in a row (steps 3-5)" in stderr and "ckpt-00000002.pt" in stderr
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2]  # none written during the bad streak
    assert not (out / "backbone.safetensors").exists()


_SIGINT_SCRIPT = """
import os, signal, sys
from sparsify.recipes import pretrain
real = pretrain.Pretrainer.train_step
n = {"calls": 0}
def step(self, model, it):
    n["calls"] += 1
    if n["calls"] == 3:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 3
    return real(self, model, it)
pretrain.Pretrainer.train_step = step
sys.exit(pretrain.main(sys.argv[1:]))
"""


def test_ctrl_c_saves_a_checkpoint_then_exits(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "int"
    args = ["--data", str(image_folder), *FAST, "--steps", "50", "--save-every", "100", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", _SIGINT_SCRIPT, *args], capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    assert proc.returncode == 130, proc.stderr
    assert "saving a checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [3]
    state = json.loads((out / "config.json").read_text())
    assert state["steps"] == 50
    assert max(losses(out)) == 3
