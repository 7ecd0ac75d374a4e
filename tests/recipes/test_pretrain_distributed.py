"""Two processes (torchrun, gloo on CPU) x batch b take the same step as one process x batch 2b."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _recipe_helpers import TINY, losses
from sparsify.recipes import pretrain

COMMON = [
    "--batch-size",
    "8",
    "--decoder-width",
    "32",
    "--steps",
    "2",
    "--save-every",
    "1",
    "--keep",
    "0",
    "--base-lr",
    "0.5",
    "--warmup-steps",
    "0",
    "--vis-images",
    "0",
    "--no-tensorboard",
    "--workers",
    "0",
    "--device",
    "cpu",
    "--seed",
    "1",
]
ARGS = ["--model", TINY, "--input-size", "32", *COMMON]


def _torchrun(args: list[str], out: Path, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "sparsify.recipes.pretrain", *args, "--out", str(out)]  # fmt: skip
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    assert "is deprecated" not in proc.stderr  # torch.distributed.nn.functional.all_reduce warned on every rank
    return proc


def _assert_same_steps(one: Path, two: Path) -> None:
    """The two runs' losses and every floating tensor of their checkpoints agree, step by step."""
    la, lb = losses(one), losses(two)
    assert la[1] == pytest.approx(lb[1], rel=1e-5)
    for step in (1, 2):
        a = torch.load(one / "checkpoints" / f"ckpt-{step:08d}.pt", weights_only=True)["model"]
        b = torch.load(two / "checkpoints" / f"ckpt-{step:08d}.pt", weights_only=True)["model"]
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], torch.Tensor) and a[k].is_floating_point():
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"step {step}: {k}")
    assert la[2] == pytest.approx(lb[2], rel=1e-4)


@pytest.mark.slow
def test_two_processes_match_one(image_folder: Path, tmp_path: Path) -> None:
    data = ["--data", str(image_folder)]
    one = tmp_path / "one"
    assert pretrain.main([*data, *ARGS, "--out", str(one)]) == 0
    _torchrun([*data, *ARGS], tmp_path / "two", tmp_path)
    _assert_same_steps(one, tmp_path / "two")


@pytest.mark.slow
def test_two_processes_match_one_on_volumes(tmp_path: Path) -> None:
    """The 3-D decoder's BatchNorm3d and densify's masked BatchNorm3d share statistics across ranks too
    (they were per rank before: the step-1 weights differed in sign while the first losses agreed)."""
    args = ["--volumes", "--input-size", "32", "--sample-length", "8", *COMMON]  # the built-in 3-D network
    one = tmp_path / "one"
    assert pretrain.main([*args, "--out", str(one)]) == 0
    proc = _torchrun(args, tmp_path / "two", tmp_path)
    assert "3-D" in proc.stdout
    _assert_same_steps(one, tmp_path / "two")
