"""Resuming a run with a new command line: refuse what cannot change, point out what did.

Settings that fix the shapes of the saved state (the model, input size, channels, decoder) cannot change
on resume; the refusal says what to do instead. Other settings may change (a new batch size, mask ratio
or seed is a deliberate choice), but never silently: each one is named in a notice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .cli import RecipeError, parse_input_size

__all__ = ["check_resume"]


def _same(key: str, mine: Any, theirs: Any) -> bool:
    if key == "model":
        from .models import same_model_spec

        return same_model_spec(str(mine), str(theirs))
    if key == "input_size":  # the saved size has the run's rank: "16" is a cube for a 3-D run
        rank = len(theirs) if isinstance(theirs, (list, tuple)) else 2
        try:
            return parse_input_size(mine, rank) == parse_input_size(theirs, rank)
        except RecipeError:
            return False
    if key == "crop_scale" and isinstance(theirs, (list, tuple)):
        return [float(v) for v in str(mine).split(",")] == [float(v) for v in theirs]
    if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)):
        return float(mine) == float(theirs)
    return mine == theirs


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def check_resume(
    out: Path,
    explicit: Mapping[str, Any],
    saved: Mapping[str, Any],
    resolved: Mapping[str, Any],
    fixed: Iterable[str],
    noticed: Iterable[str],
) -> list[str]:
    """Compare the flags given now with the settings of the run being resumed.

    Args:
        out: the run folder (for messages).
        explicit: the settings given on this command line.
        saved: the settings stored in the checkpoint (``None`` = left to a default at the time).
        resolved: what those defaults turned out to be (e.g. the model's own ``in_chans``).
        fixed: keys that may not change.
        noticed: keys that may change, with a notice.

    Returns:
        one notice line per changed setting in ``noticed``.

    Raises:
        RecipeError: when a key in ``fixed`` differs.
    """

    def theirs(key: str) -> Any:
        value = saved.get(key)
        return resolved.get(key) if value is None else value

    for key in fixed:
        old = theirs(key)
        if key in explicit and old is not None and not _same(key, explicit[key], old):
            raise RecipeError(
                f"'{out}' holds a run with {_flag(key)} {old!r}, but this command asks for {explicit[key]!r}, "
                f"which does not fit its saved weights; choose another --out for a new run, or delete "
                f"'{out / 'checkpoints'}' to start this folder over"
            )
    notices = []
    for key in noticed:
        old = theirs(key)
        if key in explicit and old is not None and not _same(key, explicit[key], old):
            notices.append(
                f"note: {_flag(key)} changes from {old} (the checkpoint's) to {explicit[key]} for the rest of this run"
            )
    return notices
