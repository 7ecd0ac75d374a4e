"""The run folder of a recipe: where it lives, which checkpoint a run resumes from, and checkpoint retention.

``<out>/checkpoints/`` holds the full training states (see :mod:`.checkpoint` for the file format);
``<out>/config.json`` the resolved settings of the latest start. Pretraining and fine-tuning share it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .cli import RecipeError

__all__ = ["RunFolder"]

_NEVER = ("never", "no", "none", "false")


class RunFolder:
    """One run's output folder and its checkpoints."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = Path(out)
        self.ckpt_dir = self.out / "checkpoints"

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
                    f"--resume never, but '{self.out}' already holds checkpoints; choose another --out or delete "
                    "that folder"
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
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(self.ckpt_dir)
        (self.out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def save_checkpoint(self, state: dict[str, Any], step: int, keep: int) -> Path:
        """Write ``state`` as the checkpoint of ``step`` (atomically), then keep only the newest ``keep``."""
        path = ckpt.atomic_save(state, ckpt.checkpoint_path(self.ckpt_dir, step))
        ckpt.prune_checkpoints(self.ckpt_dir, keep)
        return path
