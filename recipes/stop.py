"""Graceful stopping: SIGINT / SIGTERM finish the current step, save a checkpoint, then exit."""

from __future__ import annotations

import signal
import sys
from typing import Any

__all__ = ["StopRequest"]


class StopRequest:
    """Turns SIGINT / SIGTERM into "save a checkpoint after this step, then exit"; twice = exit now."""

    def __init__(self, verbose: bool) -> None:
        self.reason: str | None = None
        self.verbose = verbose
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.reason is not None:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        if self.verbose:
            print(
                f"\n{self.reason}: saving a checkpoint after this step, then stopping "
                "(press Ctrl-C again to quit at once)",
                file=sys.stderr,
                flush=True,
            )
