"""The run folder: its lock (refuses a second live run, never stuck after a kill), write checks, and
checkpoint writes that refuse poisoned states and survive a full disk."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sparsify.recipes import checkpoint as ckpt
from sparsify.recipes.cli import RecipeError
from sparsify.recipes.run_folder import RunFolder, release_inherited_locks

# Another run, as the lock protocol sees it (flock on <out>/.lock, holder named inside); plain Python so
# that it starts in milliseconds.
_HOLD = """
import fcntl, os, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"pid {os.getpid()}".encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_second_run_refused_until_the_holder_is_killed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RecipeError, match="another run is using .*pid") as err:
            RunFolder(out).lock()
        assert "choose another --out" in str(err.value)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with RunFolder(out):  # the kernel dropped the dead process's lock: nothing stuck
            with pytest.raises(RecipeError, match="another run"):
                RunFolder(out).lock()  # and it excludes others in this process too
        RunFolder(out).lock().unlock()
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_forked_children_do_not_keep_the_lock(tmp_path: Path) -> None:
    # Data-loader workers are forked: without release_inherited_locks they would hold the lock on.
    folder = RunFolder(tmp_path / "run").lock()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what a data-loader worker does, then lives on
        try:
            release_inherited_locks()
            os.write(write, b"x")
            signal.pause()
        finally:
            os._exit(0)
    try:
        os.read(read, 1)
        folder.unlock()
        RunFolder(tmp_path / "run").lock().unlock()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_unwritable_folder_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(RecipeError, match="cannot write to the run folder .*permissions or choose another --out"):
        RunFolder(blocker / "run").check_writable()
    RunFolder(tmp_path / "ok" / "run").check_writable()
    assert list((tmp_path / "ok" / "run").iterdir()) == []  # the probe is removed

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(RecipeError, match="the disk is full.*free some space"):
        RunFolder(tmp_path / "ok" / "run").check_writable()
    monkeypatch.undo()
    assert list((tmp_path / "ok" / "run").iterdir()) == []


def _state(step: int, value: float = 1.0) -> dict:
    return {
        "format": ckpt.CHECKPOINT_FORMAT,
        "step": step,
        "model": {"bn.running_var": torch.full((4,), value), "w": torch.ones(3)},
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
    }


def test_poisoned_state_is_never_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = RunFolder(tmp_path)
    assert folder.save_checkpoint(_state(1), 1, keep=0) is not None
    assert folder.save_checkpoint(_state(2, float("inf")), 2, keep=0) is None
    assert "not saving the checkpoint of step 2" in capsys.readouterr().err
    poisoned_optimizer = _state(3)
    poisoned_optimizer["optimizer"]["state"][0]["exp_avg"][1] = float("nan")
    assert folder.save_checkpoint(poisoned_optimizer, 3, keep=0) is None
    assert [s for s, _ in ckpt.list_checkpoints(folder.ckpt_dir)] == [1]


def test_full_disk_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = RunFolder(tmp_path)
    folder.save_checkpoint(_state(1), 1, keep=1)

    def full(obj: object, f: object) -> None:
        f.write(b"part of a checkpoint")  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(RecipeError, match="disk is full.*ckpt-00000001.pt is kept"):
        folder.save_checkpoint(_state(2), 2, keep=1)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.ckpt_dir.iterdir()) == ["ckpt-00000001.pt"]
    state, _ = ckpt.load_checkpoint(folder.latest())
    assert state["step"] == 1
