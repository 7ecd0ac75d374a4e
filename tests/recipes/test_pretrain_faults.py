"""sparsify-pretrain under injected faults: poisoned statistics, damaged checkpoints, a second process,
an unwritable or full disk, and resumes with changed flags."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from _recipe_helpers import FAST_PRETRAIN, run_pretrain
from sparsify.recipes import checkpoint as ckpt
from sparsify.recipes import pretrain
from sparsify.recipes.cli import RecipeError
from sparsify.recipes.resume import check_resume
from sparsify.recipes.run_folder import RunFolder
from test_recipe_checkpoint import flip_tensor_byte

FAST = FAST_PRETRAIN + ["--vis-images", "0", "--base-lr", "0.05"]
run = run_pretrain


def _steps(out: Path) -> list[int]:
    return [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")]


def test_overflowed_running_variance_is_skipped_restored_and_never_saved(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A finite loss whose forward pushed a BatchNorm running variance to Inf (the decoder's, here).
    real_step = pretrain.Pretrainer.train_step
    calls = {"n": 0}

    def overflow(self: pretrain.Pretrainer, model: torch.nn.Module, it: object) -> tuple[float, int]:
        loss, images = real_step(self, model, it)
        calls["n"] += 1
        if calls["n"] == 2:
            bn = next(m for m in self.spark.decoder.modules() if getattr(m, "running_var", None) is not None)
            bn.running_var[0] = float("inf")
        return loss, images

    monkeypatch.setattr(pretrain.Pretrainer, "train_step", overflow)
    out = tmp_path / "run"
    args = ["--data", str(image_folder), *FAST, "--steps", "4", "--save-every", "2", "--keep", "0", "--out", str(out)]
    code, _, stderr = run(args, capsys)
    assert code == 0, stderr
    assert "non-finite BatchNorm running statistics at step 2" in stderr
    assert _steps(out) == [4]  # step 2 was the bad one: no checkpoint then
    for _, path in ckpt.list_checkpoints(out / "checkpoints"):
        state = torch.load(path, weights_only=True)
        assert not ckpt.nonfinite_entries(state["model"]) and not ckpt.nonfinite_entries(state["optimizer"])


def test_damaged_checkpoint_falls_back_and_all_failed_steps_exit_nonzero(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    base = ["--data", str(image_folder), *FAST, "--save-every", "2", "--out", str(out)]
    assert run([*base, "--steps", "4"], capsys)[0] == 0
    flip_tensor_byte(out / "checkpoints" / "ckpt-00000004.pt")
    code, stdout, stderr = run([*base, "--steps", "6"], capsys)
    assert code == 0, stderr
    assert "ckpt-00000004.pt' is damaged" in stderr and "at step 2" in stdout
    assert _steps(out)[-1] == 6

    # Resume, and every remaining step fails: nothing learned, nothing saved, and the exit code says so.
    monkeypatch.setattr(pretrain.Pretrainer, "train_step", lambda self, model, it: (float("nan"), 4))
    code, _, stderr = run([*base, "--steps", "8", "--max-bad-steps", "5"], capsys)
    assert code == 1
    assert "none of the 2 steps of this run succeeded" in stderr and "ckpt-00000006.pt" in stderr
    assert _steps(out)[-1] == 6


def test_second_run_on_a_locked_folder_is_refused(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    with RunFolder(out):  # a live run holds the folder
        code, _, stderr = run(["--data", str(image_folder), *FAST, "--steps", "1", "--out", str(out)], capsys)
    assert code == 2
    assert "another run is using" in stderr and "Traceback" not in stderr
    assert not (out / "checkpoints").exists()


def test_unwritable_out_fails_before_the_model_is_built(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sparsify.recipes import train_loop

    def no_model(*a: object, **k: object) -> None:
        raise AssertionError("the model was built before the output folder was checked")

    monkeypatch.setattr(train_loop, "build_model", no_model)
    (tmp_path / "file").write_text("x")
    code, _, stderr = run(["--data", str(image_folder), *FAST, "--out", str(tmp_path / "file" / "run")], capsys)
    assert code == 2 and "cannot write to the run folder" in stderr


def test_full_disk_is_one_message_and_keeps_the_last_checkpoint(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_save = torch.save
    calls = {"n": 0}

    def fills_up(obj: object, f: object, *a: object, **k: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", fills_up)
    out = tmp_path / "run"
    code, _, stderr = run(
        ["--data", str(image_folder), *FAST, "--steps", "4", "--save-every", "2", "--out", str(out)], capsys
    )
    assert code != 0
    assert "disk is full" in stderr and "ckpt-00000002.pt is kept" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-00000002.pt"]
    assert ckpt.load_checkpoint(out / "checkpoints" / "ckpt-00000002.pt")[0]["step"] == 2


def test_resume_messages(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    base = ["--data", str(image_folder), *FAST, "--save-every", "2", "--out", str(out)]
    assert run([*base, "--steps", "2"], capsys)[0] == 0
    # --in-chans 3 is what the run used (the model's default): not a mismatch. New batch size / seed: notices.
    code, stdout, stderr = run([*base, "--steps", "3", "--in-chans", "3", "--batch-size", "2", "--seed", "5"], capsys)
    assert code == 0, stderr
    assert "--batch-size changes from 4" in stdout and "--seed changes from 0" in stdout
    # a real mismatch: the advice given must itself work
    code, _, stderr = run([*base, "--steps", "4", "--decoder-width", "16"], capsys)
    assert code == 2 and "--resume never" not in stderr
    assert f"delete '{out / 'checkpoints'}'" in stderr
    import shutil

    shutil.rmtree(out / "checkpoints")
    assert run([*base, "--steps", "1", "--decoder-width", "16"], capsys)[0] == 0


def test_resume_check_compares_meanings_not_spellings(tmp_path: Path) -> None:
    keys, notice = pretrain.SHAPE_KEYS, pretrain.NOTICE_KEYS
    saved = {"model": "resnet18", "in_chans": None, "input_size": [64, 64], "mask_ratio": None, "batch_size": 32}
    resolved = {"in_chans": 3, "mask_ratio": 0.6}
    given = {"model": "timm:resnet18", "in_chans": 3, "input_size": "64", "mask_ratio": 0.6, "batch_size": 32}
    assert check_resume(tmp_path, given, saved, resolved, keys, notice) == []
    notes = check_resume(tmp_path, {"mask_ratio": 0.75}, saved, resolved, keys, notice)
    assert notes == ["note: --mask-ratio changes from 0.6 (the checkpoint's) to 0.75 for the rest of this run"]
    for wrong in ({"model": "torchvision:resnet18"}, {"in_chans": 1}, {"input_size": "96"}):
        with pytest.raises(RecipeError, match="delete"):
            check_resume(tmp_path, wrong, saved, resolved, keys, notice)


def test_default_run_folders_of_model_sources_differ() -> None:
    names = {pretrain.resolve_config({"model": m}).out for m in ("resnet18", "torchvision:resnet18", "a/b.py:resnet18")}
    assert len(names) == 3
    assert pretrain.resolve_config({"model": "timm:resnet18"}).out == pretrain.resolve_config({"model": "resnet18"}).out


def test_dist_timeout_reaches_the_process_group(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sparsify.recipes import distributed
    from sparsify.recipes.cli import RecipeError

    seen: dict[str, object] = {}

    def fake_setup(device: object = None, timeout_minutes: float = 30.0) -> None:
        seen["timeout"] = timeout_minutes
        raise RecipeError("stopped after setup")

    monkeypatch.setattr(distributed, "setup", fake_setup)
    args = ["--data", str(image_folder), *FAST, "--out", str(tmp_path / "r"), "--dist-timeout", "7.5"]
    assert run(args, capsys)[0] == 2 and seen["timeout"] == 7.5
    code, _, stderr = run([*args[:-1], "0"], capsys)
    assert code == 2 and "--dist-timeout must be > 0" in stderr
