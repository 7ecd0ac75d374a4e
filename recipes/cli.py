"""Shared command-line plumbing for the recipes: the user-error type, size parsing, exit codes.

Every problem a user can fix (a missing data folder, an unknown model name, an input size that does
not fit the model) is raised as :class:`RecipeError` (or sparsify's own :class:`SparsifyError`) and
turned by :func:`run_main` into one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import errno
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from sparsify.errors import SparsifyError

__all__ = [
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "RecipeError",
    "parse_size",
    "parse_input_size",
    "parse_crop_scale",
    "format_size",
    "run_main",
    "warn",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class RecipeError(Exception):
    """A problem with the command line, the data or the model that the user can fix.

    The message must say what was wrong and what to do; the recipes print it and exit with code 2.
    """


def _size_values(text: str | int | Sequence[int]) -> list[int]:
    """The integers of ``224``, ``"192x256"``, ``"48*64,64"`` or ``(192, 256)``; [] when one is not an integer."""
    if isinstance(text, int):
        parts: list[str] = [str(text)]
    elif isinstance(text, str):
        parts = text.lower().replace("*", "x").replace(",", "x").split("x")
    else:
        parts = [str(v) for v in text]
    try:
        return [int(p.strip()) for p in parts]
    except ValueError:
        return []


def parse_size(text: str | int | Sequence[int]) -> tuple[int, int]:
    """Parse ``224``, ``"224"``, ``"192x256"`` (H x W) or ``(192, 256)`` into ``(H, W)``.

    Raises:
        RecipeError: when the text is not one or two positive integers.
    """
    values = _size_values(text)
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise RecipeError(f"input size must be one positive integer or HxW (e.g. 224 or 192x256), got {text!r}")
    return values[0], values[1]


def parse_input_size(text: str | int | Sequence[int], rank: int = 2) -> tuple[int, ...]:
    """Parse ``--input-size`` for a ``rank``-D run: ``N`` (a square for 2-D, a cube for 3-D), ``HxW`` (2-D)
    or ``DxHxW`` (3-D); a sequence of ints (a resumed run's setting) is taken as it is.

    Raises:
        RecipeError: when the text is not positive integers, or their count does not fit ``rank``.
    """
    forms = {2: "N (a square) or HxW, e.g. 224 or 192x256", 3: "N (a cube) or DxHxW, e.g. 64 or 48x64x64"}
    values = _size_values(text)
    what = "volumes" if rank == 3 else "images"
    if not values or min(values) <= 0:
        raise RecipeError(f"input size must be positive integers: {forms.get(rank, 'N')}; got {text!r}")
    if len(values) == 1:
        values = values * rank
    if len(values) != rank:
        other = {2: "2-D (HxW)", 3: "3-D (DxHxW)"}.get(len(values), f"{len(values)}-D")
        raise RecipeError(
            f"--input-size {text!r} is {other} but this run trains on {rank}-D {what}: give {forms.get(rank, 'N')}"
        )
    return tuple(values)


def parse_crop_scale(text: str | Sequence[float]) -> tuple[float, float]:
    """Parse a RandomResizedCrop area range ``"0.08,1"`` (or a pair) into ``(min, max)``.

    Raises:
        RecipeError: unless it is two numbers with 0 < min <= max <= 1.
    """
    if isinstance(text, (list, tuple)):
        vals = [float(v) for v in text]
    else:
        try:
            vals = [float(v) for v in str(text).replace(" ", "").split(",")]
        except ValueError:
            vals = []
    if len(vals) != 2 or not 0.0 < vals[0] <= vals[1] <= 1.0:
        raise RecipeError(f"--crop-scale must be 'min,max' with 0 < min <= max <= 1, got {text!r}")
    return vals[0], vals[1]


def format_size(size: Sequence[int]) -> str:
    """``(224, 224)`` -> ``"224"``, ``(192, 256)`` -> ``"192x256"``, ``(32, 64, 64)`` -> ``"32x64x64"``."""
    return str(size[0]) if len(set(size)) == 1 else "x".join(str(v) for v in size)


def warn(message: str) -> None:
    """Print a warning line on stderr without breaking an active progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(f"warning: {message}", file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        print(f"warning: {message}", file=sys.stderr, flush=True)


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run ``body`` and turn user errors into one clear stderr line and exit code 2.

    A full disk (``ENOSPC``) anywhere is one line and exit code 1. Set ``SPARSIFY_TRACEBACK=1`` to see the
    full traceback of such an error as well.
    """
    try:
        return body()
    except (RecipeError, SparsifyError) as err:
        if os.environ.get("SPARSIFY_TRACEBACK"):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except OSError as err:
        if err.errno not in _DISK_FULL or os.environ.get("SPARSIFY_TRACEBACK"):
            raise
        where = f" while writing '{err.filename}'" if err.filename else ""
        print(
            f"{prog}: error: the disk is full (no space left on device){where}; free some space, then run the "
            "same command again (a run resumes from its last checkpoint, which is kept)",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_FAILED


def quiet_known_warnings() -> None:
    """Silence third-party warnings that say nothing actionable to a recipe user."""
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    warnings.filterwarnings("ignore", message=".*Overwriting .* in registry.*")
