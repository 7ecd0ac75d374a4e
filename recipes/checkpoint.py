"""Checkpoints: atomic writes, everything needed for an exact resume, automatic discovery, pruning.

A checkpoint is ``<out>/checkpoints/ckpt-<step:08d>.pt`` holding the model, optimiser, gradient
scaler, step (which fixes the learning-rate/weight-decay schedule and the data position), the RNG
states of every rank (torch, CUDA, Python, NumPy, the mask generator) and the run configuration.
It is written to a temporary file in the same folder, flushed to disk, then renamed over the final
name, so a run killed at any instant (even SIGKILL) leaves either the old or the new file, never half
of one. Everything in it is plain tensors and Python containers, so it loads with
``torch.load(weights_only=True)``.

Damage is detected, not trusted: :func:`seal` stores a digest of the whole content (every tensor's
bytes, dtype and shape, every key and value) under ``"checksum"``, and :func:`load_checkpoint` recomputes
it, so flipped bytes that still unpickle are reported; a checkpoint holding non-finite weights, buffers
or optimiser state is never written (:func:`nonfinite_entries`) and never resumed from. Either way the
previous good checkpoint is used.
"""

from __future__ import annotations

import hashlib
import math
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
    "content_digest",
    "nonfinite_entries",
    "seal",
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


def _feed(h: Any, obj: Any) -> None:
    """Feed ``obj`` into the hash ``h`` in a canonical form (type tags keep different structures apart)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            h.update(f"K{type(k).__name__}:{k!r}".encode())
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    else:  # str, int, float, bool, None: repr is exact and stable
        h.update(f"S{type(obj).__name__}:{obj!r}".encode())


def content_digest(state: Mapping[str, Any]) -> str:
    """A BLAKE2b digest of everything in ``state`` except its ``"checksum"`` entry."""
    h = hashlib.blake2b(digest_size=32)
    _feed(h, {k: v for k, v in state.items() if k != "checksum"})
    return h.hexdigest()


def seal(state: dict[str, Any]) -> dict[str, Any]:
    """Add the content digest that :func:`load_checkpoint` verifies; returns ``state``."""
    state["checksum"] = content_digest(state)
    return state


def nonfinite_entries(obj: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors (and floats) in ``obj`` that hold a NaN or an infinity."""
    bad: list[str] = []
    if isinstance(obj, torch.Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()):
            bad.append(prefix or "tensor")
    elif isinstance(obj, float):
        if not math.isfinite(obj):
            bad.append(prefix or "value")
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            bad += nonfinite_entries(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad += nonfinite_entries(v, f"{prefix}[{i}]")
    return bad


def _problem(state: Any, expected_format: str) -> str | None:
    """Why ``state`` must not be resumed from, or ``None`` when it is sound."""
    if not isinstance(state, Mapping) or state.get("format") != expected_format:
        return f"not a {expected_format.split('/')[0]} checkpoint"
    if "checksum" in state and state["checksum"] != content_digest(state):
        return "damaged (its content does not match its checksum)"
    bad = nonfinite_entries({k: state[k] for k in ("model", "optimizer") if k in state})
    if bad:
        return f"holds non-finite values ({len(bad)} tensors, e.g. {bad[0]})"
    return None


def load_checkpoint(
    path: str | os.PathLike[str], fallback: bool = True, expected_format: str = CHECKPOINT_FORMAT
) -> tuple[dict, Path]:
    """Load and verify a checkpoint (``weights_only=True``); if it is unusable and ``fallback``, try older ones.

    A checkpoint is unusable when it does not unpickle, is of another format, fails its checksum, or
    holds non-finite weights or optimiser state. Each one passed over is reported on stderr.

    Returns:
        (state, path actually loaded).

    Raises:
        RecipeError: when no usable checkpoint is found.
    """
    path = Path(path)
    candidates = [path]
    if fallback:
        candidates += [p for _, p in reversed(list_checkpoints(path.parent)) if p != path]
    errors = []
    for i, p in enumerate(candidates):
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
            problem = _problem(state, expected_format)
        except Exception as err:  # noqa: BLE001 - any failure to read means "use an older one"
            problem = f"unreadable ({type(err).__name__}: {err})"
        if problem is None:
            return dict(state), p
        errors.append(f"{p.name}: {problem}")
        more = i + 1 < len(candidates)
        warn(f"checkpoint '{p}' is {problem}; {'trying an older one' if more else 'no older one is left'}")
    raise RecipeError(
        f"no usable checkpoint at '{path}' ({'; '.join(errors)}); to start over, choose another --out or delete "
        f"'{path.parent}'"
    )


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
