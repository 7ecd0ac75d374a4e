"""Reporting of a pretraining run: console lines, reconstruction pictures, the final outputs and summary.

The functions read a run through :class:`PretrainRun`, the attributes they need, not through the loop's
class: the loop (:mod:`.train_loop`) imports this module, never the other way round.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .cli import format_size, warn
from .config import PROG
from .logs import plot_loss_curve, read_metrics
from .models import portable_model_spec
from .optim import optimizer_betas

__all__ = [
    "PretrainRun",
    "say",
    "silent",
    "vis_batch",
    "write_reconstructions",
    "finish_outputs",
    "header",
    "summary",
    "checkpoint_bytes",
]

#: columns of the reconstruction pictures: input | masked input | prediction | prediction in the visible input
RECON_COLUMNS = ("input", "masked", "reconstruction", "composite")


class PretrainRun(Protocol):
    """What the reporting functions read from a pretraining run (:class:`~.train_loop.Pretrainer` has it)."""

    cfg: Any  # the run's PretrainConfig
    env: dist_utils.DistEnv
    out: Path
    ckpt_dir: Path
    resume_from: Path | None
    spark: nn.Module
    dataset: Any  # ImageFiles or SampleImages
    data_desc: str
    mean: tuple[float, ...] | None  # None for volumes (normalised per volume)
    std: tuple[float, ...] | None
    grid: tuple[int, ...]
    volume_facts: list[str]  # header lines of a volume run (empty for images)
    mask_ratio: float
    visible: int
    vis: tuple[torch.Tensor, torch.Tensor] | None
    plan: Any  # batching.BatchPlan
    total_steps: int
    steps_per_epoch: int
    warmup_steps: int
    peak_lr: float
    norm_type: str
    drop_path: float
    workers: int
    save_every: int
    knn: Any  # knn.KnnMonitor or None
    knn_history: list[tuple[int, float]]
    skipped: Any  # data.SkipCounter
    logger: Any  # logs.RunLogger or None
    say: Callable[..., None]
    save_reconstructions: Callable[..., Path]
    export_backbone: Callable[..., Any]

    def knn_schedule(self) -> str: ...


def checkpoint_bytes(t: PretrainRun) -> int:
    """Approximate size of one checkpoint: parameters and buffers, plus the optimiser's two moments."""
    spark = dist_utils.unwrap(t.spark)
    params = sum(p.numel() * p.element_size() for p in spark.parameters())
    buffers = sum(b.numel() * b.element_size() for b in spark.buffers())
    return 3 * params + buffers


def _checkpoint_contents(t: PretrainRun) -> str:
    """What fills a checkpoint: the user's model is often the small part, SparK's decoder the large one."""
    spark = dist_utils.unwrap(t.spark)
    encoder = {id(p) for p in spark.encoder.parameters()}
    mine = sum(p.numel() for p in spark.parameters() if id(p) in encoder)
    spark_own = sum(p.numel() for p in spark.parameters() if id(p) not in encoder)
    return (
        f"{_count(mine)} parameters of your model and {_count(spark_own)} of SparK's decoder and densify layers "
        f"(decoder width {t.cfg.decoder_width}; --decoder-width sets it), each with {t.cfg.opt}'s two moments"
    )


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def _megabytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def say(message: str = "", file: Any = None) -> None:
    """Print a line without breaking an active tqdm progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=file if file is not None else sys.stdout)


def silent(message: str = "", file: Any = None) -> None:
    """``say`` on ranks other than 0."""


def vis_batch(t: PretrainRun) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Fixed images and masks for the reconstruction pictures (the same at the start and the end)."""
    n = min(t.cfg.vis_images, len(t.dataset), 16)
    if n <= 0:
        return None
    saved_epoch = t.dataset.epoch
    t.dataset.set_epoch(-1)
    idx = torch.linspace(0, len(t.dataset) - 1, n).round().long().tolist()
    x = torch.stack([t.dataset[i][0] for i in idx])
    t.dataset.set_epoch(saved_epoch)
    g = torch.Generator().manual_seed(t.cfg.seed + 4242)
    from sparsify.masking import random_mask

    mask = random_mask(n, t.grid, t.mask_ratio, generator=g)
    return x, mask


def write_reconstructions(t: PretrainRun, name: str) -> Path | None:
    """Write a reconstruction grid to ``<out>/<name>`` (main process); a failure only warns."""
    if not t.env.is_main or t.vis is None:
        return None
    spark = dist_utils.unwrap(t.spark)
    was_training = spark.training
    spark.eval()
    try:
        x, mask = t.vis
        x = x.to(t.env.device)
        mask = mask.to(t.env.device)
        if t.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            out = spark.reconstruct(x, mask=mask)
        # volumes: the three orthogonal planes through the centre of each volume
        planes = {"num_slices": 1} if x.dim() == 5 else {}
        path = t.save_reconstructions(
            out, t.out / name, columns=RECON_COLUMNS, mean=t.mean, std=t.std, labels=True, **planes
        )
    except Exception as err:  # noqa: BLE001 - pictures must never lose a run
        warn(f"could not write {name}: {type(err).__name__}: {err}")
        path = None
    finally:
        spark.train(was_training)
    return path


def finish_outputs(t: PretrainRun) -> dict[str, Path]:
    """Export the backbone, the final pictures and the loss curve; returns what was written."""
    written: dict[str, Path] = {}
    if not t.env.is_main:
        return written
    backbone = t.out / "backbone.safetensors"
    tmp = t.out / f".backbone.tmp-{os.getpid()}.safetensors"
    # The header names the model; a factory file by its absolute path, so that fine-tuning finds it anywhere.
    size = [int(v) for v in t.cfg.input_size]
    # the rank and the crop it was pretrained at (and, for volumes, how intensities were normalised)
    extra: dict[str, Any] = {"spatial_rank": len(size), "crop": size}
    if t.cfg.volumes:
        extra["intensity"] = (t.cfg.intensity or "percentile") if t.cfg.data else "synthetic"
    t.export_backbone(dist_utils.unwrap(t.spark), tmp, model=portable_model_spec(t.cfg.model), metadata=extra)
    os.replace(tmp, backbone)
    written["backbone"] = backbone
    end = write_reconstructions(t, "recon_end.png")
    if end is not None:
        written["recon_end"] = end
        if t.logger is not None:
            t.logger.add_image("reconstructions/end", end, t.total_steps)
    curve = plot_loss_curve(
        read_metrics(t.out / "metrics.jsonl"),
        t.out / "loss_curve.png",
        title=f"SparK pretraining of {t.cfg.model}",
    )
    if curve is not None:
        written["loss_curve"] = curve
    return written


def header(t: PretrainRun, start: int) -> None:
    """The lines printed before training: data, SparK geometry, schedule, hardware, run folder."""
    cfg = t.cfg
    procs = f"{t.env.world_size} processes" if t.env.distributed else "1 process"
    epochs = t.total_steps / t.steps_per_epoch
    rank = len(cfg.input_size)
    unit = "px" if rank == 2 else "voxels"
    patch = "x".join(str(s // g) for s, g in zip(cfg.input_size, t.grid))
    if rank == 2:
        t.say(f"{PROG}: {cfg.model} on {t.data_desc}, {format_size(cfg.input_size)} px")
        where = f"patch {cfg.input_size[0] // t.grid[0]} px"
    else:
        t.say(f"{PROG}: {cfg.model} on {t.data_desc}, {rank}-D, crop {'x'.join(map(str, cfg.input_size))} {unit}")
        where = f"{rank}-D, patch {patch} {unit} per axis (D x H x W)"
    t.say(
        f"  SparK: {where} -> "
        f"{'x'.join(map(str, t.grid))} patches, "
        f"mask ratio {t.mask_ratio} ({t.visible} visible), decoder width {cfg.decoder_width}"
    )
    for line in getattr(t, "volume_facts", None) or []:
        t.say(line)
    if cfg.lr is not None:
        rule = "set by --lr"
    else:
        factor = f"sqrt({cfg.batch_size}/256)" if cfg.lr_rule == "sqrt" else f"{cfg.batch_size}/256"
        rule = f"{cfg.base_lr:g} x {factor}"
        if cfg.min_lr:
            rule = f"max({rule}, {cfg.min_lr:g})"
    betas = optimizer_betas(cfg.opt, t.norm_type)
    t.say(
        f"  {t.total_steps} steps (~{epochs:.3g} epochs of {t.steps_per_epoch} steps), "
        f"{t.plan.describe(t.env.world_size)}, peak lr {t.peak_lr:.3g} ({rule}), warm-up {t.warmup_steps} steps, "
        f"{cfg.opt}{f' betas {betas}' if betas else ''}, wd {cfg.weight_decay}->{cfg.weight_decay_end}, "
        f"drop path {t.drop_path}"
    )
    t.say(
        f"  {cfg.precision}{' channels_last' if cfg.channels_last else ''}"
        f"{' compiled' if cfg.compile else ''} on {t.env.device}, {procs}, "
        f"{t.workers} data workers; "
        f"out: {t.out}"
    )
    size = checkpoint_bytes(t)
    keep = "all" if cfg.keep == 0 else str(cfg.keep)
    minutes = f" and every {cfg.save_minutes:g} minutes" if cfg.save_minutes else ""
    t.say(
        f"  checkpoints: ~{_megabytes(size)} each (model and optimiser state), every {t.save_every} steps{minutes}, "
        f"keeping {keep}{f' (~{_megabytes(size * cfg.keep)})' if cfg.keep else ''}"
    )
    t.say(f"    each holds {_checkpoint_contents(t)}")
    if t.knn is not None:
        t.say(f"  k-NN monitor: {t.knn.description} from '{cfg.knn_data}', k={cfg.knn_k}, {t.knn_schedule()}")
    if start:
        t.say(f"  resuming from {t.resume_from} at step {start}")
    if cfg.preset == "volumes" and cfg.data is None:
        t.say(
            "  (--volumes without --data: the offline volume default, synthetic phantoms. For scans pass --data DIR "
            "(.nii/.nii.gz/.npy/.npz/DICOM) and your network with --model; the 'scans' preset then crops 64^3)"
        )
    if cfg.preset == "demo" and cfg.data is None:
        t.say(
            "  (no --data: the quick demo settings. For real runs pass --data DIR; the defaults then follow "
            "the SparK paper (resnet50, 224 px, 1600 epochs, decoder width 768) at the batch this machine "
            "holds; --preset paper for the paper's batch 4096)"
        )


def summary(t: PretrainRun, outputs: dict[str, Path], losses: list[tuple[int, float]]) -> None:
    """The lines printed after training: the loss, skipped files, the outputs and how to load them."""
    if not t.env.is_main:
        return
    if losses:
        first_step, first = losses[0]
        last_step, last = losses[-1]
        tail = [v for _, v in losses[-10:]]
        head = [v for _, v in losses[:10]]
        t.say(
            f"loss: first {first:.4f} (step {first_step}) -> last {last:.4f} (step {last_step}); "
            f"mean of first {len(head)}: {sum(head) / len(head):.4f}, of last {len(tail)}: "
            f"{sum(tail) / len(tail):.4f}"
        )
    if t.knn_history:
        (s0, a0), (s1, a1) = t.knn_history[0], t.knn_history[-1]
        t.say(
            f"k-NN top-1 ({t.knn.description}): {100 * a0:.1f}% at step {s0} -> {100 * a1:.1f}% at step {s1} "
            f"({100 * (a1 - a0):+.1f} points)"
        )
    if t.skipped.count and getattr(t.skipped, "noun", "image") != "image":
        t.say(f"skipped {t.skipped.count} damaged {t.skipped.noun} file(s) (the run went on without them):")
        entries = sorted(t.skipped.paths)
        for entry in entries[:20]:
            t.say(f"  {entry}")
        if len(entries) > 20:
            t.say(f"  ... and {len(entries) - 20} more (all of them are in the checkpoint's 'skipped_files')")
    elif t.skipped.count:
        t.say(f"skipped {t.skipped.count} unreadable image file(s)")
    latest = ckpt.latest_checkpoint(t.ckpt_dir)
    t.say(f"outputs in {t.out}/:")
    pictures = [n for n in ("recon_start.png", "recon_end.png") if (t.out / n).is_file()]
    rows = [
        ("backbone.safetensors", "pretrained weights of your model (original names, no head)"),
        (str(latest.relative_to(t.out)) if latest else "checkpoints/", "full checkpoint (resume)"),
        ("metrics.jsonl", "one JSON row per step"),
        ("tensorboard/", f"TensorBoard events (tensorboard --logdir {t.out})"),
        (
            ", ".join(pictures),
            "reconstructions: input | masked | prediction | prediction in visible input"
            + (" (axial, coronal, sagittal planes through the centre)" if len(t.cfg.input_size) == 3 else ""),
        ),
        ("loss_curve.png", "loss against step"),
    ]
    for name, what in rows:
        if name and (t.out / name.split(",")[0]).exists():
            t.say(f"  {name:32s} {what}")
    spec = t.cfg.model
    if ":" not in spec or spec.startswith("timm:"):
        name = spec.split(":", 1)[-1]
        t.say(
            f"load it: timm.create_model('{name}', pretrained=True, num_classes=0, "
            f"pretrained_cfg_overlay=dict(file='{t.out / 'backbone.safetensors'}'))"
            "  (num_classes=0: no head; pass your own class count for a new head)"
        )
