"""When a training loss is healthy, and what a run does when it is not.

The rule (stated in ``--help`` and the README) has three parts:

* **A healthy loss** is finite and at most ``spike_factor`` times the median of the last
  :data:`WINDOW` healthy losses of the run (any finite loss is healthy while there is no history yet).
  A step whose loss is not healthy, or whose gradients or BatchNorm statistics are not finite, is a
  *bad step*: its update is skipped and the BatchNorm running statistics it touched are restored.
* **A good checkpoint** is one whose own weights gave a healthy loss: the checkpoint of step s is held
  back until the next finite loss (the loss of step s's weights) has been judged, and is written only
  if that loss is healthy. So every checkpoint in a run folder is good, and ``--resume auto`` (the
  newest) resumes from a good one. (Checkpoints written when a run is stopped or ends, and one held
  back when a run diverges before any finite loss judged it, are written as they are: nothing has
  judged them, and nothing has shown them bad.)
* **Divergence** is ``max_bad_steps`` bad steps in a row. By default the run stops and names the
  newest checkpoint and the flag to change; with rollback it reloads that checkpoint, multiplies the
  learning rate by ``rollback_lr_factor``, goes on with the next batches (those since the checkpoint
  are skipped, the offending ones with them), and gives up after ``max_rollbacks`` rollbacks.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["WINDOW", "LossHealth", "cpu_copy"]

#: how many recent healthy losses the spike test compares against
WINDOW = 20


class LossHealth:
    """The healthy-loss rule over a run's recent history (see the module docstring).

    Args:
        spike_factor: a finite loss above ``spike_factor`` x the median of the recent healthy losses is a
            spike; 0 turns the spike test off (only non-finite losses are bad).
        history: recent healthy losses, oldest first (a resumed run's).
    """

    def __init__(self, spike_factor: float, history: Iterable[float] = ()) -> None:
        self.spike_factor = float(spike_factor)
        self.recent: deque[float] = deque((float(v) for v in history), maxlen=WINDOW)

    def problem(self, loss: float) -> str | None:
        """Why ``loss`` is not healthy (a short phrase for messages), or ``None`` when it is."""
        if not math.isfinite(loss):
            return "non-finite loss"
        if self.spike_factor > 0 and self.recent:
            median = statistics.median(self.recent)
            if loss > self.spike_factor * median:
                return (
                    f"loss spike ({loss:.4g} > {self.spike_factor:g} x {median:.4g}, the median of the last "
                    f"{len(self.recent)} healthy losses)"
                )
        return None

    def record(self, loss: float) -> None:
        """Remember a healthy loss."""
        self.recent.append(float(loss))

    def state(self) -> list[float]:
        """The history, for a checkpoint."""
        return list(self.recent)


def cpu_copy(obj: Any) -> Any:
    """A copy of a (nested) state whose tensors are cloned to the CPU: it no longer changes with training."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj
