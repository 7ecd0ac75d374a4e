"""Checkpoints: atomic writes, everything needed for an exact resume, automatic discovery, pruning.

A checkpoint is ``<out>/checkpoints/ckpt-<step:08d>.pt`` holding the model, optimiser, gradient
scaler, step (which fixes the learning-rate/weight-decay schedule and the data position), the RNG
states of every rank (torch, CUDA, Python, NumPy, the mask generator) and the run configuration.
It is written to a temporary file in the same folder, flushed to disk, then renamed over the final
name, so a run killed at any instant (even SIGKILL) leaves either the old or the new file, never half
of one. Everything in it is plain tensors and Python containers, so it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cli import RecipeError, warn

__all__ = [
    "CHECKPOINT_FORMAT",
    "atomic_save",
    "checkpoint_path",
    "list_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "remove_stale_temporaries",
    "rng_state",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "sparsify-pretrain/1"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def checkpoint_path(folder: str | os.PathLike[str], step: int) -> Path:
    """``<folder>/ckpt-<step:08d>.pt``."""
    return Path(folder) / f"ckpt-{step:08d}.pt"


def list_checkpoints(folder: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint in ``folder``, or ``None``."""
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def load_checkpoint(path: str | os.PathLike[str], fallback: bool = True) -> tuple[dict, Path]:
    """Load a checkpoint (``weights_only=True``); if it is unreadable and ``fallback``, try older ones.

    Returns:
        (state, path actually loaded).

    Raises:
        RecipeError: when no readable checkpoint is found.
    """
    path = Path(path)
    candidates = [path]
    if fallback:
        candidates += [p for _, p in reversed(list_checkpoints(path.parent)) if p != path]
    errors = []
    for p in candidates:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            errors.append(f"{p.name}: {type(err).__name__}: {err}")
            warn(f"checkpoint '{p}' is unreadable ({type(err).__name__}); trying an older one")
            continue
        if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
            errors.append(f"{p.name}: not a sparsify-pretrain checkpoint")
            continue
        return dict(state), p
    raise RecipeError(f"no readable checkpoint at '{path}' ({'; '.join(errors)})")


def prune_checkpoints(folder: str | os.PathLike[str], keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return
    for _, p in list_checkpoints(folder)[:-keep]:
        try:
            p.unlink()
        except OSError:
            pass


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> int:
    """Delete temporary files left by writes that were killed; returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for p in folder.glob(".ckpt-*.pt.tmp-*"):
        try:
            p.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def rng_state(mask_generator: torch.Generator | None = None) -> dict[str, Any]:
    """This process's RNG states, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [
            str(np_state[0]),
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if mask_generator is not None:
        state["mask_generator"] = mask_generator.get_state()
    return state


def set_rng_state(state: Mapping[str, Any], mask_generator: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if mask_generator is not None and "mask_generator" in state:
        mask_generator.set_state(state["mask_generator"])
