"""Helpers for the recipe tests: tiny generated image folders, the tiny CNN, running the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
TINY = f"{HERE / 'tiny_models.py'}:tiny_cnn"

#: Flags of a fast pretraining run on the tiny CNN (tests add --data/--out/--steps and their own).
FAST_PRETRAIN = ["--model", TINY, "--input-size", "32", "--batch-size", "4", "--decoder-width", "32",
                 "--workers", "0", "--no-tensorboard"]


# Runs the CLI in a fresh interpreter and SIGKILLs it half-way through writing its KILL_AT-th checkpoint
# (argv[1]; the CLI's own arguments follow).
KILL_SCRIPT = """
import os, signal, sys
import torch
from sparsify.recipes import checkpoint
real_save = torch.save
calls = {"n": 0}
kill_at = int(sys.argv.pop(1))
def save(obj, f, *a, **k):
    calls["n"] += 1
    if calls["n"] == kill_at:
        f.write(b"the first bytes of a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
checkpoint.torch.save = save
from sparsify.recipes import pretrain
sys.exit(pretrain.main(sys.argv[1:]))
"""


def run_killed(args: list[str], cwd: Path, kill_at: int = 3, timeout: float = 300) -> subprocess.CompletedProcess:
    """``sparsify-pretrain args`` in a subprocess that ``kill -9``s itself while writing checkpoint ``kill_at``."""
    return subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(kill_at), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def run_pretrain(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``sparsify-pretrain`` in-process: (exit code, stdout, stderr)."""
    from sparsify.recipes import pretrain

    code = pretrain.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _smooth_image(rng: np.random.Generator, h: int, w: int, tint: np.ndarray | None = None) -> np.ndarray:
    """A smooth random picture (a learnable signal, unlike white noise)."""
    small = rng.random((4, 5, 3))
    img = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=np.float32)
    img = img + rng.normal(0, 8, img.shape)
    if tint is not None:
        img = 0.5 * img + 0.5 * tint
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, n: int = 12, corrupt: int = 1, size: tuple[int, int] = (40, 52)) -> Path:
    """ImageFolder-style tree of ``n`` PNG/JPEG images (two classes, nested) plus ``corrupt`` bad files."""
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / f"class{i % 2}" / ("deep" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        ext = "png" if i % 2 else "jpg"
        Image.fromarray(_smooth_image(rng, *size)).save(sub / f"img{i:03d}.{ext}")
    for j in range(corrupt):
        (root / "class0" / f"broken{j}.jpg").write_bytes(b"\xff\xd8\xff this is not really a jpeg")
    return root


def make_labelled_folder(root: Path, per_class: int = 8, classes: int = 2, size: tuple[int, int] = (36, 36)) -> Path:
    """A labelled ImageFolder whose classes differ by colour (so a classifier can learn them)."""
    rng = np.random.default_rng(1)
    tints = [np.array([230, 40, 40]), np.array([40, 40, 230]), np.array([40, 230, 40])]
    for c in range(classes):
        d = root / f"cls{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_smooth_image(rng, *size, tint=tints[c % 3])).save(d / f"{i}.png")
    return root


def metrics(run: Path) -> list[dict]:
    """Rows of a run's metrics.jsonl."""
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run: Path) -> dict[int, float]:
    """step -> loss of a run."""
    return {r["step"]: r["loss"] for r in metrics(run)}


def make_photo_crops(root: Path, per_class: int = 12, size: int = 48) -> Path:
    """A labelled ImageFolder of random crops of three real photographs (scikit-image's), one class each.

    Real image statistics (not a colour per class), so that k-NN accuracy sits well below 100% at random
    initialisation and can move either way.
    """
    import skimage.data as skdata

    rng = np.random.default_rng(2)
    for name in ("astronaut", "coffee", "chelsea"):
        photo = np.asarray(getattr(skdata, name)())
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            y = int(rng.integers(0, photo.shape[0] - size))
            x = int(rng.integers(0, photo.shape[1] - size))
            Image.fromarray(photo[y : y + size, x : x + size]).save(d / f"{i}.png")
    return root
