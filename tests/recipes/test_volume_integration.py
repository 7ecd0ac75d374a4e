"""Issue 16's "Done when": ``sparsify-pretrain --model net.py:build --data DIR --input-size 16`` on a folder of
real NIfTI samples (nibabel's), compressed NIfTI, ``.npy`` volumes and one damaged file runs to the end naming
the damaged file, writes slice pictures and a backbone that loads strictly into ``build()``; killed with
SIGKILL mid-run, the same command resumes and finishes (with the losses of an uninterrupted run that read
its data with two data-loader workers)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _recipe_helpers import losses, run_killed
from sparsify.recipes import pretrain
from sparsify.recipes.checkpoint import list_checkpoints

nib = pytest.importorskip("nibabel")

# The user's own 3-D network in a factory file: a headless encoder (what nnU-Net-style code loads a
# pretrained encoder into), stride 4, BatchNorm, a residual add.
NET_PY = '''
import torch
from torch import nn


class Encoder3d(nn.Module):
    def __init__(self, in_chans=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(in_chans, 8, 3, stride=2, padding=1), nn.BatchNorm3d(8), nn.ReLU())
        self.down = nn.Conv3d(8, 16, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm3d(16)
        self.refine = nn.Conv3d(16, 16, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.norm(self.down(self.stem(x))))
        return x + self.refine(x)


def build():
    return Encoder3d()
'''


def _scan_folder(root: Path) -> Path:
    """nibabel's real samples, generated .nii.gz and .npy volumes, and one damaged file."""
    from nibabel.testing import data_path

    root.mkdir()
    for name in ("anatomical.nii", "reoriented_anat_moved.nii", "standard.nii.gz"):  # the last one is padded
        shutil.copy(Path(data_path) / name, root / name)
    rng = np.random.default_rng(0)
    for i in range(2):
        vol = (rng.normal(100, 20, (20, 24, 18)) + 50 * (i + 1)).astype(np.int16)
        nib.save(nib.Nifti1Image(vol, np.diag([1.5, 1.0, 1.0, 1.0])), root / f"generated{i}.nii.gz")
        np.save(root / f"array{i}.npy", rng.normal(0, 1, (18, 20, 22)).astype(np.float32))
    (root / "damaged.nii.gz").write_bytes(b"\x1f\x8b\x08 this is not a complete gzip stream")
    return root


@pytest.mark.slow
def test_scan_folder_end_to_end_with_kill_and_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the command names net.py relative to the working folder
    data = _scan_folder(tmp_path / "scans")
    (tmp_path / "net.py").write_text(NET_PY)
    out = tmp_path / "run"
    args = ["--model", "net.py:build", "--data", str(data), "--input-size", "16",
            "--steps", "8", "--batch-size", "4", "--save-every", "2", "--decoder-width", "16", "--workers", "0",
            "--vis-every", "4", "--no-tensorboard", "--out", str(out)]  # fmt: skip

    straight = tmp_path / "straight"  # the same run uninterrupted (two data-loader workers), for the losses
    assert pretrain.main([*args[:-1], str(straight), "--vis-images", "0", "--workers", "2"]) == 0
    proc = run_killed(args, tmp_path, kill_at=3)  # dies while writing its third checkpoint (step 6)
    assert proc.returncode == -9, proc.stderr
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2, 4]
    assert "damaged.nii.gz" in proc.stderr  # named as soon as it was found
    head = proc.stdout
    assert "3-D, crop 16x16x16 voxels" in head and "patch 4x4x4 voxels per axis" in head and "4x4x4 patches" in head
    assert "intensity rule: percentile" in head and "2 mm" in head and "padded with the background" in head

    capsys.readouterr()
    assert pretrain.main(args) == 0  # the same command
    printed = capsys.readouterr()
    assert "resuming from" in printed.out and "at step 4" in printed.out
    assert sorted(losses(out)) == list(range(1, 9))
    a, b = losses(straight), losses(out)
    for step in a:  # the same crops, flips and masks, whatever the workers: resuming changes nothing
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6), step
    summary = printed.out[printed.out.index("loss: first") :]
    assert "skipped 1 damaged volume file(s)" in summary and "damaged.nii.gz" in summary  # named again at the end
    for name in ("recon_start.png", "recon_latest.png", "recon_end.png", "backbone.safetensors"):
        assert (out / name).is_file(), name

    # the exported backbone loads strictly into the user's own network, and says what it was trained on
    import importlib.util

    from safetensors import safe_open
    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location("user_net", tmp_path / "net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build()
    model.load_state_dict(load_file(str(out / "backbone.safetensors")), strict=True)
    with safe_open(str(out / "backbone.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["sparsify.spatial_rank"] == "3" and meta["sparsify.crop"] == "[16, 16, 16]"
    assert meta["sparsify.left_out"] == "[]"
    assert torch.isfinite(model(torch.randn(1, 1, 16, 16, 16))).all()
