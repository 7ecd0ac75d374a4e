"""Run records: ``metrics.jsonl``, TensorBoard events, the loss-curve picture, progress output.

(Named ``logs`` rather than ``logging`` so that it can never shadow the standard library module.)

Only rank 0 creates a :class:`RunLogger`. On resume the JSONL file is cut back to the resumed step
and TensorBoard is told to purge later events, so the records of a resumed run read like those of an
uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["RunLogger", "read_metrics", "plot_loss_curve", "progress"]


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file (unparsable lines, e.g. a torn last line, are dropped)."""
    rows = []
    p = Path(path)
    if not p.is_file():
        return rows
    with open(p, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def plot_loss_curve(
    rows: list[Mapping[str, Any]], path: str | os.PathLike[str], title: str = "SparK pretraining"
) -> Path | None:
    """Plot loss against step (raw and smoothed) to a PNG with matplotlib's Agg backend."""
    points = [
        (r["step"], r["loss"])
        for r in rows
        if "loss" in r and r.get("loss") is not None and math.isfinite(float(r["loss"]))
    ]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    steps = [p[0] for p in points]
    losses = [float(p[1]) for p in points]
    alpha = 2.0 / (1.0 + max(2.0, min(50.0, len(losses) / 10.0)))
    smooth, value = [], losses[0]
    for v in losses:
        value = (1 - alpha) * value + alpha * v
        smooth.append(value)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss")
    ax.plot(steps, smooth, color="tab:blue", linewidth=2, label="smoothed")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("masked-patch loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


class RunLogger:
    """Writes metric rows to ``metrics.jsonl`` and TensorBoard (``<out>/tensorboard``).

    Args:
        out: the run folder.
        resume_step: when resuming from a checkpoint taken after ``resume_step`` steps, rows with
            ``step > resume_step`` (steps that will be redone) are removed first.
        tensorboard: also write TensorBoard events.
    """

    def __init__(self, out: str | os.PathLike[str], resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        else:
            kept = [r for r in read_metrics(self.path) if r.get("step", -1) <= resume_step]
            tmp = self.path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(
                    log_dir=str(self.out / "tensorboard"),
                    purge_step=resume_step + 1 if resume_step is not None else None,
                )
            except Exception as err:  # noqa: BLE001 - TensorBoard is a convenience, never fatal
                from .cli import warn

                warn(f"TensorBoard logging disabled: {type(err).__name__}: {err}")

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """Append one row ``{"step": step, **values}``; numeric values also go to TensorBoard."""
        row = {"step": int(step)}
        for k, v in values.items():
            if isinstance(v, float) and not math.isfinite(v):
                v = None if math.isnan(v) else str(v)
            row[k] = v
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                    self.writer.add_scalar(f"train/{k}" if "/" not in k else k, v, step)

    def add_image(self, tag: str, path: str | os.PathLike[str], step: int) -> None:
        """Put a PNG written elsewhere into TensorBoard too."""
        if self.writer is None:
            return
        try:
            import numpy as np
            from PIL import Image

            arr = np.asarray(Image.open(path).convert("RGB"))
            self.writer.add_image(tag, arr, step, dataformats="HWC")
        except Exception:  # noqa: BLE001
            pass

    def flush(self) -> None:
        self._file.flush()
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close both outputs."""
        self._file.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def progress(total: int, initial: int, enabled: bool, desc: str = "pretrain") -> Any:
    """A tqdm progress bar over optimiser steps (disabled on ranks other than 0)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
        smoothing=0.1,
    )
