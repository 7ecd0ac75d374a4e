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


def flip_tensor_byte(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor stored in a torch checkpoint (it still unpickles)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    header = info.header_offset
    name_len = int.from_bytes(raw[header + 26 : header + 28], "little")
    extra_len = int.from_bytes(raw[header + 28 : header + 30], "little")
    raw[header + 30 + name_len + extra_len + info.file_size // 2] ^= 0x08
    path.write_bytes(bytes(raw))


def _sealed(step: int, fill: float = 1.0) -> dict:
    state = _state(step)
    state["model"] = {"w": torch.linspace(0, 1, 64), "running_var": torch.full((8,), fill)}
    state["optimizer"] = {"state": {0: {"exp_avg": torch.zeros(64)}}, "param_groups": [{"lr": 0.1}]}
    return ckpt.seal(state)


def test_flipped_bytes_are_detected_and_the_previous_checkpoint_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for s in (1, 2):
        ckpt.atomic_save(_sealed(s), ckpt.checkpoint_path(tmp_path, s))
    damaged = ckpt.checkpoint_path(tmp_path, 2)
    flip_tensor_byte(damaged)
    torch.load(damaged, weights_only=True)  # the damage is silent to torch itself
    state, used = ckpt.load_checkpoint(damaged)
    assert state["step"] == 1 and used.name == "ckpt-00000001.pt"
    assert "ckpt-00000002.pt' is damaged" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="damaged"):
        ckpt.load_checkpoint(damaged, fallback=False)


def test_nonfinite_checkpoint_is_not_resumed_from(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt.atomic_save(_sealed(1), ckpt.checkpoint_path(tmp_path, 1))
    ckpt.atomic_save(_sealed(2, fill=float("inf")), ckpt.checkpoint_path(tmp_path, 2))  # written by an old version
    state, used = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 2))
    assert state["step"] == 1
    assert "non-finite values" in capsys.readouterr().err


def test_content_digest_sees_every_part() -> None:
    base = _sealed(3)
    assert ckpt.content_digest(base) == base["checksum"]
    for change in (
        lambda s: s["model"]["w"].__setitem__(5, 0.5),
        lambda s: s["optimizer"]["param_groups"][0].__setitem__("lr", 0.2),
        lambda s: s.__setitem__("step", 4),
        lambda s: s["model"].__setitem__("w", s["model"]["w"].double()),
    ):
        other = _sealed(3)
        change(other)
        assert ckpt.content_digest(other) != base["checksum"]
