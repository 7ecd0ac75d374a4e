"""Checkpoints: atomic writes, discovery, pruning, fallback, RNG round trips."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from sparsify.recipes import checkpoint as ckpt
from sparsify.recipes.cli import RecipeError


def _state(step: int) -> dict:
    return {"format": ckpt.CHECKPOINT_FORMAT, "step": step, "w": torch.full((3,), float(step))}


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt-00000001.pt"
    ckpt.atomic_save(_state(1), path)

    def broken_save(obj: object, f: object) -> None:
        f.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt.atomic_save(_state(2), path)
    monkeypatch.undo()
    state, _ = ckpt.load_checkpoint(path)
    assert state["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001.pt"]  # no temporary left


def test_latest_prune_and_fallback(tmp_path: Path) -> None:
    for s in (2, 4, 6, 8):
        ckpt.atomic_save(_state(s), ckpt.checkpoint_path(tmp_path, s))
    (tmp_path / ".ckpt-00000010.pt.tmp-1").write_bytes(b"junk")  # a killed write
    assert ckpt.latest_checkpoint(tmp_path).name == "ckpt-00000008.pt"
    ckpt.prune_checkpoints(tmp_path, 2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6, 8]
    ckpt.checkpoint_path(tmp_path, 8).write_bytes(b"corrupted")
    state, used = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert state["step"] == 6 and used.name == "ckpt-00000006.pt"
    with pytest.raises(RecipeError):
        ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 8), fallback=False)


def test_rng_state_round_trip_weights_only(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(7)
    ckpt.atomic_save({"rng": ckpt.rng_state(g)}, tmp_path / "r.pt")
    first = (torch.rand(3), random.random(), np.random.rand(), torch.rand(3, generator=g))
    state = torch.load(tmp_path / "r.pt", weights_only=True)
    ckpt.set_rng_state(state["rng"], g)
    again = (torch.rand(3), random.random(), np.random.rand(), torch.rand(3, generator=g))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and first[2] == again[2]
    assert torch.equal(first[3], again[3])
