"""The run folder of a recipe: where it lives, who may use it, which checkpoint a run resumes from.

``<out>/checkpoints/`` holds the full training states (see :mod:`.checkpoint` for the file format);
``<out>/config.json`` the resolved settings of the latest start; ``<out>/.lock`` the lock that keeps a
second run off the folder while one is alive. The lock is an ``fcntl.flock`` on that file: the kernel
drops it when its process ends, however it ends (even SIGKILL), so it is never left stuck. Pretraining and
fine-tuning share all of this.

A run that fails before its first step, in a folder it created, removes that folder again (and the
parents it created): a wrong flag does not leave ``runs/<name>/`` holding only a ``.lock``. A failed run
that got further keeps its logs and says so.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .cli import RecipeError, warn

try:  # POSIX; elsewhere runs go unlocked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunFolder", "release_inherited_locks"]

_NEVER = ("never", "no", "none", "false")
_LOCK_NAME = ".lock"
_held_fds: list[int] = []  # lock files this process holds (closed in forked data-loader workers)


def release_inherited_locks() -> None:
    """Close the lock files a forked child inherited, so that only the run's own process holds the lock.

    (An ``flock`` lives as long as any descriptor of it is open: without this, data-loader workers that
    outlive a killed main process for a few seconds would keep its folder locked.)
    """
    while _held_fds:
        try:
            os.close(_held_fds.pop())
        except OSError:
            pass


def _is_disk_full(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _disk_message(err: OSError) -> str:
    if _is_disk_full(err):
        return "the disk is full (no space left on device)"
    return err.strerror or str(err)


class RunFolder:
    """One run's output folder: write check, lock, resume choice, checkpoints."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = Path(out)
        self.ckpt_dir = self.out / "checkpoints"
        self._lock_fd: int | None = None
        self._created: list[Path] = []  # folders this process made, innermost first (removed if unused)

    # ---- before anything is built
    def _make(self) -> None:
        """Create the folder, remembering which of it and its parents did not exist before."""
        missing = [d for d in (self.out, *self.out.parents) if not d.exists()]
        self.out.mkdir(parents=True, exist_ok=True)
        if not self._created:
            self._created = missing

    def check_writable(self) -> None:
        """Create the folder and write a small probe file in it; a clear :class:`RecipeError` if that fails."""
        probe = self.out / f".write-test-{os.getpid()}"
        try:
            self._make()
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            advice = "free some space" if _is_disk_full(err) else "fix the folder's permissions"
            raise RecipeError(
                f"cannot write to the run folder '{self.out}': {_disk_message(err)}; {advice} or choose another --out"
            ) from err
        finally:
            try:
                probe.unlink()
            except OSError:
                pass

    def lock(self) -> RunFolder:
        """Take the folder's lock, or refuse with a clear message when another live run holds it."""
        if fcntl is None or self._lock_fd is not None:  # pragma: no cover - no flock on this platform
            return self
        self._make()
        path = self.out / _LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip()
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RecipeError(
                f"another run is using '{self.out}'{f' ({holder})' if holder else ''}; wait for it to finish "
                "or stop it, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._lock_fd = fd
        _held_fds.append(fd)
        return self

    def unlock(self) -> None:
        """Release the lock (also released by the kernel when the process ends)."""
        if self._lock_fd is None:
            return
        fd, self._lock_fd = self._lock_fd, None
        if fd in _held_fds:
            _held_fds.remove(fd)
        os.close(fd)

    def close(self, failed: bool, say: Any = None) -> None:
        """End this process's use of the folder: release the lock; after a failure, tidy up what it made.

        ``failed``: the run ended with an error or an interruption. A folder this process created is then
        removed with the parents it created when no step finished (nothing in it is worth keeping: no
        checkpoint, no logged step); one that holds a failed run's logs is kept and named through ``say``.
        """
        try:
            if not (failed and self._created and self._lock_fd is not None):
                return
            if self.latest() is None and not _logged_a_step(self.out / "metrics.jsonl"):
                shutil.rmtree(self.out, ignore_errors=True)  # still locked: no other run is inside
                for parent in self._created[1:]:
                    try:
                        parent.rmdir()  # only while empty
                    except OSError:
                        break
            elif self.latest() is None and say is not None:
                say(f"the failed run's logs are in '{self.out}' (no checkpoint was written)")
        finally:
            self.unlock()

    def __enter__(self) -> RunFolder:
        return self.lock()

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    # ---- checkpoints
    def latest(self) -> Path | None:
        """The newest checkpoint of this run, or ``None``."""
        return ckpt.latest_checkpoint(self.ckpt_dir)

    def find_resume(self, resume: str) -> Path | None:
        """The checkpoint ``--resume`` asks for: ``auto`` (newest here, if any), ``never``, a file or a folder."""
        if resume in ("auto", ""):
            return self.latest()
        if resume in _NEVER:
            if self.latest() is not None:
                raise RecipeError(
                    f"--resume never, but '{self.out}' already holds checkpoints; choose another --out, or delete "
                    f"'{self.ckpt_dir}' to start this folder over"
                )
            return None
        path = Path(resume).expanduser()
        if path.is_dir():
            found = ckpt.latest_checkpoint(path) or ckpt.latest_checkpoint(path / "checkpoints")
            if found is None:
                raise RecipeError(f"--resume {resume}: no checkpoint in that folder")
            return found
        if not path.is_file():
            raise RecipeError(f"--resume {resume}: no such checkpoint file ('auto', 'never' or a path)")
        return path

    def prepare(self, config: dict[str, Any]) -> None:
        """Create the folder, clear temporaries of killed writes, record the settings (main process only)."""
        self._make()
        ckpt.remove_stale_temporaries(self.ckpt_dir)
        (self.out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def save_checkpoint(self, state: dict[str, Any], step: int, keep: int) -> Path | None:
        """Seal and write ``state`` as the checkpoint of ``step``, then keep only the newest ``keep``.

        A state holding non-finite weights, buffers or optimiser values is not written (``None``, with a
        warning): it would become "the last good checkpoint" and every resume would fail the same way.
        A write that fails (a full disk) leaves the previous checkpoints untouched and raises a
        :class:`RecipeError` that says so.
        """
        bad = ckpt.nonfinite_entries({k: state[k] for k in ("model", "optimizer") if k in state})
        if bad:
            latest = self.latest()
            warn(
                f"not saving the checkpoint of step {step}: {len(bad)} tensors hold non-finite values "
                f"(e.g. {bad[0]}); the last good checkpoint is {latest if latest else 'none yet'}"
            )
            return None
        try:
            path = ckpt.atomic_save(ckpt.seal(state), ckpt.checkpoint_path(self.ckpt_dir, step))
        except OSError as err:
            latest = self.latest()
            kept = f"the previous checkpoint {latest} is kept" if latest else "no earlier checkpoint exists"
            raise RecipeError(
                f"could not write the checkpoint of step {step} in '{self.ckpt_dir}': {_disk_message(err)}; "
                f"{kept}. Free some space, then run the same command again to resume"
            ) from err
        ckpt.prune_checkpoints(self.ckpt_dir, keep)
        return path


def _logged_a_step(metrics: Path) -> bool:
    """Whether a run's ``metrics.jsonl`` records a finished step (step 0 is the state before training)."""
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except OSError:
        return False
    for line in lines:
        try:
            if int(json.loads(line).get("step", 0)) >= 1:
                return True
        except (ValueError, AttributeError, TypeError):
            continue
    return False
