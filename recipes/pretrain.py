"""``sparsify-pretrain``: SparK masked pretraining of any CNN on a folder of images.

Run with no arguments, it is a quick demonstration: a small CNN pretrained for a few minutes on CPU on
photographs bundled with scikit-image. With ``--data DIR`` the defaults are the SparK paper's ImageNet
recipe (design.md section 7): ResNet-50, 224 px, batch 4096, 1600 epochs, LAMB, base lr 2e-4 x
batch/256, 40 warm-up epochs, weight decay cosine 0.04 -> 0.2, mask ratio 0.6. Every flag overrides.

Outputs go to ``runs/<name>/`` (or ``--out``): ``checkpoints/`` (full state, atomic, auto-resumed),
``backbone.safetensors`` (the pretrained model's weights, original names, head removed),
``metrics.jsonl``, ``tensorboard/``, ``recon_start.png`` / ``recon_end.png`` and ``loss_curve.png``.

Multi-GPU / multi-node: ``torchrun --nproc-per-node 8 -m sparsify.recipes.pretrain --data DIR ...``
(``--batch-size`` is the global batch).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .cli import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    RecipeError,
    format_size,
    parse_size,
    quiet_known_warnings,
    run_main,
    warn,
)
from .data import (
    GlobalBatchSampler,
    ImageFiles,
    RandomResizedCropFlip,
    SampleImages,
    SkipCounter,
    collate_images,
    default_normalisation,
    estimate_channel_stats,
    find_images,
)
from .logs import RunLogger, plot_loss_curve, progress, read_metrics
from .models import build_model, default_drop_path, head_prefixes, load_init, model_slug
from .optim import betas_for_norm, create_optimizer, param_groups, set_lr_and_wd
from .schedules import lr_at, wd_at

__all__ = ["PRESETS", "PretrainConfig", "build_parser", "resolve_config", "main"]

PROG = "sparsify-pretrain"

# Values used for every setting the command line leaves out. "paper" is the SparK ImageNet recipe;
# "demo" (the default when --data is not given) is sized to finish in about three minutes on 2 CPU cores.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "model": "resnet50",
        "input_size": "224",
        "epochs": 1600.0,
        "batch_size": 4096,
        "base_lr": 2e-4,
        "warmup": 40.0,
        "decoder_width": 768,
    },
    "demo": {
        "model": "resnet18",
        "input_size": "96",
        "steps": 100,
        "batch_size": 32,
        "base_lr": 0.24,  # lr 0.03 at batch 32: a short run needs large LAMB steps
        "warmup_steps": 10,
        "decoder_width": 128,
        "crop_scale": "0.2,1",
    },
}

# Settings shared by both presets (design.md section 7 where it says).
COMMON_DEFAULTS: dict[str, Any] = {
    "weight_decay": 0.04,
    "weight_decay_end": 0.2,
    "clip_grad": 5.0,
    "precision": "fp32",
    "channels_last": False,
    "compile": False,
    "accum": 1,
    "seed": 0,
    "keep": 3,
    "densify_norm": "auto",
    "opt": "lamb",
    "crop_scale": "0.67,1",
    "max_bad_steps": 5,
    "log_every": 1,
    "vis_images": 8,
    "sample_length": 576,
    "tensorboard": True,
}

# Settings that fix the shapes of the saved state: a resumed run may not change them.
_SHAPE_KEYS = ("model", "input_size", "in_chans", "decoder_width", "densify_norm")


@dataclasses.dataclass
class PretrainConfig:
    """Every resolved setting of a pretraining run (stored in its checkpoints)."""

    model: str
    data: str | None
    input_size: tuple[int, int]
    in_chans: int | None
    epochs: float | None
    steps: int | None
    batch_size: int
    base_lr: float
    lr: float | None
    mask_ratio: float | None
    warmup: float | None
    warmup_steps: int | None
    weight_decay: float
    weight_decay_end: float
    clip_grad: float
    precision: str
    channels_last: bool
    compile: bool
    workers: int | None
    accum: int
    seed: int
    out: str
    save_every: int | None
    keep: int
    decoder_width: int
    densify_norm: str
    drop_path: float | None
    init: str | None
    device: str | None
    opt: str
    crop_scale: tuple[float, float]
    max_bad_steps: int
    log_every: int
    vis_images: int
    sample_length: int
    tensorboard: bool
    preset: str

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        d["crop_scale"] = list(self.crop_scale)
        return d


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """The command line of ``sparsify-pretrain`` (every default is None; presets fill them in)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "SparK masked pretraining (arXiv 2301.03580) for any CNN. With no arguments: a ~3 minute CPU "
            "demo (resnet18, 96 px, 100 steps) on photographs bundled with scikit-image. With --data: "
            "the paper's ImageNet recipe (resnet50, 224 px, batch 4096, 1600 epochs, LAMB, base lr 2e-4, "
            "40 warm-up epochs, wd 0.04->0.2, mask 0.6); override any of it with the flags below."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(),
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        help="timm name (resnet50, timm:convnext_tiny), torchvision:NAME, or "
        "package.module:function / file.py:function (never downloads weights)",
    )
    g.add_argument("--init", help="local state dict to start from (.safetensors or torch file)")
    g.add_argument("--in-chans", type=int, help="input channels (default: the model's own, usually 3)")
    g.add_argument(
        "--drop-path",
        type=float,
        help="stochastic depth rate (default: the paper's for resnet50/101/152/200, convnext_small/base/large, else 0)",
    )
    g.add_argument("--decoder-width", type=int, help="decoder width at the coarsest scale (paper 768)")
    g.add_argument("--densify-norm", choices=["auto", "batch", "layer", "none"], help="densify normalisation")
    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        help="folder of images, searched recursively (labels unused); "
        "default: scikit-image's bundled sample photographs",
    )
    d.add_argument(
        "--input-size",
        help="training resolution: 224 or HxW (multiples of the model's downsample ratio, 32 for most CNNs)",
    )
    d.add_argument("--crop-scale", help="RandomResizedCrop area range 'min,max' (paper 0.67,1)")
    d.add_argument("--workers", type=int, help="data-loading worker processes per rank")
    d.add_argument("--sample-length", type=int, help="samples per epoch of the embedded default data")
    t = p.add_argument_group("schedule")
    t.add_argument("--epochs", type=float, help="training length in epochs (paper 1600)")
    t.add_argument("--steps", type=int, help="training length in optimiser steps (overrides --epochs)")
    t.add_argument("--batch-size", type=int, help="global batch size, all processes together (paper 4096)")
    t.add_argument("--accum", type=int, help="gradient accumulation micro-steps per optimiser step")
    t.add_argument("--base-lr", type=float, help="learning rate per 256 images; lr = base-lr x batch/256 (paper 2e-4)")
    t.add_argument("--lr", type=float, help="absolute peak learning rate (overrides --base-lr)")
    t.add_argument("--warmup", type=float, help="warm-up epochs (paper 40)")
    t.add_argument("--warmup-steps", type=int, help="warm-up in optimiser steps (overrides --warmup)")
    t.add_argument("--weight-decay", type=float, help="weight decay at the start (paper 0.04)")
    t.add_argument("--weight-decay-end", type=float, help="weight decay at the end (paper 0.2)")
    t.add_argument("--clip-grad", type=float, help="gradient-norm clip (paper 5; 0 disables)")
    t.add_argument("--opt", help="timm optimiser name (paper: lamb)")
    t.add_argument("--mask-ratio", type=float, help="fraction of patches masked (0.6; 0.75 from 384 px)")
    r = p.add_argument_group("run")
    r.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="autocast precision (fp16 needs CUDA)")
    r.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format",
    )
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the step")
    r.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    r.add_argument("--seed", type=int, help="seed for weights, data order, augmentation and masks")
    r.add_argument("--out", help="run folder (default runs/<model>-<data>)")
    r.add_argument(
        "--resume",
        default="auto",
        help="'auto' (continue from the newest checkpoint in the run "
        "folder when there is one), 'never', or a checkpoint file",
    )
    r.add_argument(
        "--save-every",
        type=int,
        help="checkpoint every N steps (default: every epoch, at most every 1000 steps, and at the end)",
    )
    r.add_argument("--keep", type=int, help="checkpoints to keep (0 = all)")
    r.add_argument("--log-every", type=int, help="write metrics every N steps")
    r.add_argument("--vis-images", type=int, help="images in the reconstruction grids (0 = none)")
    r.add_argument("--max-bad-steps", type=int, help="stop after this many non-finite losses in a row")
    r.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None, help="TensorBoard events")
    r.add_argument("--preset", choices=sorted(PRESETS), help="defaults to use: 'demo' without --data, 'paper' with it")
    return p


def _epilog() -> str:
    lines = ["defaults for flags left out (an explicit flag always wins; a resumed run keeps its own):"]
    for name, values in PRESETS.items():
        when = "without --data" if name == "demo" else "with --data"
        lines.append(f"  {name} ({when}): " + ", ".join(f"{k}={v}" for k, v in values.items()))
    lines.append("  otherwise: " + ", ".join(f"{k}={v}" for k, v in COMMON_DEFAULTS.items()))
    lines.append(
        "  mask_ratio=0.6 (0.75 from 384 px); drop_path by model (paper values); warm-up at most 1/4 of the run"
    )
    lines.append("examples:")
    lines.append("  sparsify-pretrain                                  # the 3-minute CPU demo")
    lines.append("  sparsify-pretrain --data ~/photos --model resnet50 --batch-size 256 --epochs 100")
    lines.append("  torchrun --nproc-per-node 8 -m sparsify.recipes.pretrain --data /imagenet/train \\")
    lines.append("      --precision bf16 --channels-last --compile")
    return "\n".join(lines)


def _parse_scale(text: Any) -> tuple[float, float]:
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


def _explicit(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user actually gave on the command line."""
    return {k: v for k, v in vars(args).items() if v is not None and k != "resume"}


def default_out(explicit: dict[str, Any]) -> Path:
    """``runs/<model>-<data>`` for the settings given (before resume merging)."""
    preset = explicit.get("preset") or ("paper" if explicit.get("data") else "demo")
    model = explicit.get("model") or PRESETS[preset]["model"]
    data = explicit.get("data")
    data_name = Path(data).expanduser().resolve().name if data else "samples"
    return Path("runs") / f"{model_slug(model)}-{data_name or 'data'}"


def resolve_config(explicit: dict[str, Any], saved: dict[str, Any] | None = None) -> PretrainConfig:
    """Merge, by priority: explicit flags, a resumed checkpoint's settings, the preset, common defaults."""
    merged: dict[str, Any] = {}
    if saved:
        merged.update({k: v for k, v in saved.items() if v is not None})
        if "steps" in explicit or "epochs" in explicit:  # a new length replaces the old one entirely
            merged.pop("steps", None)
            merged.pop("epochs", None)
        if "warmup" in explicit or "warmup_steps" in explicit:
            merged.pop("warmup", None)
            merged.pop("warmup_steps", None)
        if "lr" in explicit or "base_lr" in explicit:
            merged.pop("lr", None)
            merged.pop("base_lr", None)
    merged.update(explicit)
    preset = merged.get("preset") or ("paper" if merged.get("data") else "demo")
    base = dict(COMMON_DEFAULTS)
    base.update(PRESETS[preset])
    for k, v in base.items():
        if merged.get(k) is None:
            merged[k] = v
    if merged.get("steps") is None and merged.get("epochs") is None:
        merged["epochs"] = PRESETS["paper"]["epochs"]
    if merged.get("warmup") is None and merged.get("warmup_steps") is None:
        merged["warmup"] = PRESETS["paper"]["warmup"]
    merged["preset"] = preset
    merged["input_size"] = parse_size(merged["input_size"])
    merged["crop_scale"] = _parse_scale(merged["crop_scale"])
    merged["out"] = str(merged.get("out") or default_out(explicit))
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    values = {k: merged.get(k) for k in fields}
    cfg = PretrainConfig(**values)
    _validate(cfg)
    return cfg


def _validate(cfg: PretrainConfig) -> None:
    checks = [
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (cfg.accum >= 1, f"--accum must be >= 1, got {cfg.accum}"),
        (cfg.steps is None or cfg.steps >= 1, f"--steps must be >= 1, got {cfg.steps}"),
        (cfg.epochs is None or cfg.epochs > 0, f"--epochs must be > 0, got {cfg.epochs}"),
        (
            cfg.mask_ratio is None or 0.0 < cfg.mask_ratio < 1.0,
            f"--mask-ratio must be in (0, 1), got {cfg.mask_ratio}",
        ),
        (cfg.base_lr > 0 and (cfg.lr is None or cfg.lr > 0), "the learning rate must be > 0"),
        (cfg.decoder_width >= 1, f"--decoder-width must be >= 1, got {cfg.decoder_width}"),
        (cfg.workers is None or cfg.workers >= 0, f"--workers must be >= 0, got {cfg.workers}"),
        (cfg.max_bad_steps >= 1, f"--max-bad-steps must be >= 1, got {cfg.max_bad_steps}"),
        (cfg.log_every >= 1, f"--log-every must be >= 1, got {cfg.log_every}"),
        (cfg.save_every is None or cfg.save_every >= 1, f"--save-every must be >= 1, got {cfg.save_every}"),
        (cfg.in_chans is None or cfg.in_chans >= 1, f"--in-chans must be >= 1, got {cfg.in_chans}"),
    ]
    for ok, message in checks:
        if not ok:
            raise RecipeError(message)


# ------------------------------------------------------------------------------------- building
def _sparsify_api() -> tuple[Any, Any, Any, Any]:
    """(wrap, SparK, save_reconstructions, export_backbone) from sparsify."""
    import sparsify

    wrap = getattr(sparsify, "wrap", None)
    if wrap is None:  # pragma: no cover - only while the core is being written
        from sparsify.encoder import wrap  # type: ignore[no-redef]
    try:
        from sparsify import SparK, export_backbone, save_reconstructions  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover
        from sparsify.spark import SparK, export_backbone, save_reconstructions
    return wrap, SparK, save_reconstructions, export_backbone


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _suggest_sizes(size: tuple[int, int], r: int) -> str:
    def near(v: int) -> int:
        return max(r, int(round(v / r)) * r)

    return format_size((near(size[0]), near(size[1])))


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


def _say(message: str = "", file: Any = None) -> None:
    """Print a line without breaking an active tqdm progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=file if file is not None else sys.stdout)


def _silent(message: str = "", file: Any = None) -> None:
    """``_say`` on ranks other than 0."""


def _worker_init(_: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C


# ------------------------------------------------------------------------------------------ run
class Pretrainer:
    """One pretraining run: builds everything from a :class:`PretrainConfig`, trains, writes outputs."""

    def __init__(
        self,
        cfg: PretrainConfig,
        env: dist_utils.DistEnv,
        resume_from: Path | None,
        resume_state: dict | None,
    ) -> None:
        self.cfg = cfg
        self.env = env
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.resume_from = resume_from
        self.resume_state = resume_state
        self.say = _say if env.is_main else _silent

    # ---- data
    def build_data(self, channels: int) -> None:
        cfg = self.cfg
        norm = default_normalisation(channels)
        if cfg.data is None:
            base = SampleImages(RandomResizedCropFlip(cfg.input_size), channels, cfg.sample_length, cfg.seed)
            if norm is None:
                norm = estimate_channel_stats(images=base.images, channels=channels)
            self.mean, self.std = norm
            base.transform = RandomResizedCropFlip(cfg.input_size, scale=cfg.crop_scale, mean=self.mean, std=self.std)
            self.dataset: ImageFiles | SampleImages = base
            self.data_desc = (
                f"the embedded sample photographs ({len(base.images)} images from scikit-image, random crops)"
            )
        else:
            paths = find_images(cfg.data)
            if norm is None:
                norm = estimate_channel_stats(paths=[str(p) for p in paths], channels=channels)
            self.mean, self.std = norm
            tf = RandomResizedCropFlip(cfg.input_size, scale=cfg.crop_scale, mean=self.mean, std=self.std)
            files = ImageFiles(paths, tf, channels=channels, seed=cfg.seed)
            files.probe()
            self.dataset = files
            self.data_desc = f"{len(paths)} images under '{cfg.data}'"
        self.sampler = GlobalBatchSampler(
            len(self.dataset), cfg.batch_size, self.env.world_size, self.env.rank, cfg.accum, cfg.seed
        )
        workers = cfg.workers
        if workers is None:
            workers = 0 if self.env.device.type == "cpu" else min(8, os.cpu_count() or 1)
        self.workers = workers
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=workers,
            collate_fn=collate_images,
            pin_memory=self.env.device.type == "cuda",
            worker_init_fn=_worker_init if workers > 0 else None,
            prefetch_factor=4 if workers > 0 else None,
        )

    # ---- model
    def build_model(self) -> None:
        cfg = self.cfg
        wrap, SparK, self.save_reconstructions, self.export_backbone = _sparsify_api()
        torch.manual_seed(cfg.seed)
        drop_path = cfg.drop_path if cfg.drop_path is not None else default_drop_path(cfg.model)
        self.drop_path = drop_path
        model = build_model(cfg.model, in_chans=cfg.in_chans, drop_path=drop_path)
        if cfg.init:
            fresh = load_init(model, cfg.init, allow_missing=head_prefixes(model))
            self.say(f"initialised from {cfg.init}" + (f" ({len(fresh)} head tensors left fresh)" if fresh else ""))
        if self.env.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.env.device)
        self.user_model = model
        enc = wrap(model, input_size=cfg.input_size)
        r = int(enc.downsample_ratio)
        h, w = cfg.input_size
        if h % r or w % r:
            raise RecipeError(
                f"--input-size {format_size(cfg.input_size)} is not a multiple of {cfg.model}'s "
                f"downsample ratio "
                f"{r}; use e.g. --input-size {_suggest_sizes(cfg.input_size, r)}"
            )
        self.grid = (h // r, w // r)
        self.mask_ratio = cfg.mask_ratio if cfg.mask_ratio is not None else (0.75 if min(h, w) >= 384 else 0.6)
        num = self.grid[0] * self.grid[1]
        visible = max(1, int(round(num * (1.0 - self.mask_ratio))))
        if visible >= num:
            raise RecipeError(
                f"at {format_size(cfg.input_size)} px the model sees only {num} patch(es) of {r} px, "
                f"and mask ratio "
                f"{self.mask_ratio} masks none of them; use a larger --input-size (e.g. {4 * r})"
            )
        self.visible = visible
        spark = SparK(enc, mask_ratio=self.mask_ratio, decoder_width=cfg.decoder_width, densify_norm=cfg.densify_norm)
        spark.to(self.env.device)
        if self.env.distributed:
            dist_utils.convert_dense_batchnorm(spark.decoder, self.env.device)
            dist_utils.convert_dense_batchnorm(spark.densify, self.env.device)
            dist_utils.convert_masked_batchnorm(spark)
        if cfg.channels_last:
            spark.to(memory_format=torch.channels_last)
        self.spark = spark
        self.enc = enc
        self.in_chans = int(enc.in_chans)
        self.norm_type = getattr(enc, "norm_type", "batch")

    # ---- optimiser and schedule
    def build_optimiser(self) -> None:
        cfg = self.cfg
        self.steps_per_epoch = self.sampler.steps_per_epoch
        if cfg.steps is not None:
            self.total_steps = int(cfg.steps)
        else:
            self.total_steps = max(1, int(math.ceil(float(cfg.epochs) * self.steps_per_epoch)))
        if cfg.warmup_steps is not None:
            warmup = int(cfg.warmup_steps)
        else:
            warmup = int(round(float(cfg.warmup) * self.steps_per_epoch))
            if warmup > self.total_steps // 4 and "warmup" not in self.explicit:
                warmup = self.total_steps // 4
        self.warmup_steps = min(warmup, self.total_steps)
        self.peak_lr = cfg.lr if cfg.lr is not None else cfg.base_lr * cfg.batch_size / 256.0
        groups = param_groups(self.spark.named_parameters(), cfg.weight_decay)
        self.optimizer = create_optimizer(
            groups, lr=self.peak_lr, weight_decay=cfg.weight_decay, norm_type=self.norm_type, opt=cfg.opt
        )
        self.params = [p for g in groups for p in g["params"]]
        if cfg.precision == "fp16" and self.env.device.type != "cuda":
            raise RecipeError("--precision fp16 needs a CUDA device; on CPU use --precision bf16 or fp32")
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        if cfg.save_every is not None:
            self.save_every = cfg.save_every
        else:
            self.save_every = max(1, min(self.steps_per_epoch, 1000))

    # ---- checkpoints
    def save(self, step: int) -> Path | None:
        rngs = dist_utils.all_gather_objects(ckpt.rng_state(self.mask_gen))
        bad = sorted(set().union(*dist_utils.all_gather_objects(sorted(self.skipped.paths))))
        path = None
        if self.env.is_main:
            state = {
                "format": ckpt.CHECKPOINT_FORMAT,
                "step": step,
                "total_steps": self.total_steps,
                "model": _unwrap(self.spark).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": rngs,
                "world_size": self.env.world_size,
                "data": {
                    "steps_per_epoch": self.steps_per_epoch,
                    "dataset_len": len(self.dataset),
                    "epoch": step // self.steps_per_epoch,
                    "step_in_epoch": step % self.steps_per_epoch,
                },
                "config": self.cfg.to_dict(),
                "skipped_files": bad,
                "first_loss": self.first_loss,
            }
            path = ckpt.atomic_save(state, ckpt.checkpoint_path(self.ckpt_dir, step))
            ckpt.prune_checkpoints(self.ckpt_dir, self.cfg.keep)
        dist_utils.barrier()
        return path

    def restore(self) -> int:
        state = self.resume_state
        assert state is not None
        _unwrap(self.spark).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rngs = state.get("rng") or []
        if len(rngs) == self.env.world_size:
            ckpt.set_rng_state(rngs[self.env.rank], self.mask_gen)
        else:
            if self.env.is_main:
                warn(
                    f"the checkpoint was written by {len(rngs)} process(es), this run has "
                    f"{self.env.world_size}; random streams restart "
                    "(results will differ from an uninterrupted run)"
                )
            if rngs:
                self.mask_gen.set_state(rngs[0]["mask_generator"])
        data = state.get("data", {})
        if data.get("dataset_len") not in (None, len(self.dataset)) and self.env.is_main:
            warn(
                f"the data changed since the checkpoint "
                f"({data.get('dataset_len')} -> {len(self.dataset)} samples); "
                "continuing from the same step with the new data"
            )
        self.skipped = SkipCounter(state.get("skipped_files", []))
        self.first_loss = state.get("first_loss")
        return int(state["step"])

    # ---- pictures and exports
    def vis_batch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        n = min(self.cfg.vis_images, len(self.dataset), 16)
        if n <= 0:
            return None
        saved_epoch = self.dataset.epoch
        self.dataset.set_epoch(-1)
        idx = torch.linspace(0, len(self.dataset) - 1, n).round().long().tolist()
        x = torch.stack([self.dataset[i][0] for i in idx])
        self.dataset.set_epoch(saved_epoch)
        g = torch.Generator().manual_seed(self.cfg.seed + 4242)
        from sparsify.masking import random_mask

        mask = random_mask(n, self.grid, self.mask_ratio, generator=g)
        return x, mask

    def write_reconstructions(self, name: str) -> Path | None:
        if not self.env.is_main or self.vis is None:
            return None
        spark = _unwrap(self.spark)
        was_training = spark.training
        spark.eval()
        try:
            x, mask = self.vis
            x = x.to(self.env.device)
            mask = mask.to(self.env.device)
            if self.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                out = spark.reconstruct(x, mask=mask)
            path = self.save_reconstructions(out, self.out / name, mean=self.mean, std=self.std)
        except Exception as err:  # noqa: BLE001 - pictures must never lose a run
            warn(f"could not write {name}: {type(err).__name__}: {err}")
            path = None
        finally:
            spark.train(was_training)
        return path

    def finish_outputs(self) -> dict[str, Path]:
        written: dict[str, Path] = {}
        if not self.env.is_main:
            return written
        backbone = self.out / "backbone.safetensors"
        tmp = self.out / f".backbone.tmp-{os.getpid()}.safetensors"
        self.export_backbone(_unwrap(self.spark), tmp)
        os.replace(tmp, backbone)
        written["backbone"] = backbone
        end = self.write_reconstructions("recon_end.png")
        if end is not None:
            written["recon_end"] = end
            if self.logger is not None:
                self.logger.add_image("reconstructions/end", end, self.total_steps)
        curve = plot_loss_curve(
            read_metrics(self.out / "metrics.jsonl"),
            self.out / "loss_curve.png",
            title=f"SparK pretraining of {self.cfg.model}",
        )
        if curve is not None:
            written["loss_curve"] = curve
        return written

    # ---- the loop
    def run(self, explicit: dict[str, Any]) -> int:
        cfg, env = self.cfg, self.env
        self.explicit = explicit
        self.mask_gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
        self.skipped = SkipCounter()
        self.first_loss: float | None = None
        if cfg.data is not None:
            find_images(cfg.data)  # a missing or empty folder stops before the model is built
        self.build_model()
        self.build_data(self.in_chans)
        self.build_optimiser()
        start = 0
        torch.manual_seed(cfg.seed * 1009 + env.rank + 1)  # drop path etc.: one stream per rank
        if self.resume_state is not None:
            start = self.restore()  # restores every RNG stream as well
        self.vis = self.vis_batch() if env.is_main else None
        self.header(start)

        self.logger = (
            RunLogger(
                self.out,
                resume_step=start if self.resume_state is not None else None,
                tensorboard=cfg.tensorboard,
            )
            if env.is_main
            else None
        )
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(self.ckpt_dir)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
        if start == 0 and env.is_main:
            path = self.write_reconstructions("recon_start.png")
            if path is not None and self.logger is not None:
                self.logger.add_image("reconstructions/start", path, 0)

        if start >= self.total_steps:
            self.say(
                f"this run is already complete ({start}/{self.total_steps} steps); pass a larger --steps or "
                "--epochs to continue it, or a new --out to start another"
            )
            outputs = self.finish_outputs()
            self.summary(outputs, losses=[])
            if self.logger is not None:
                self.logger.close()
            return EXIT_OK

        spark = self.spark
        model: nn.Module = spark
        # CUDA: DistributedDataParallel. CPU (gloo): PyTorch's DDP refuses the SyncBatchNorm layers, so
        # gradients are averaged by one flat all-reduce after backward instead (same result).
        self.manual_sync = env.distributed and env.device.type != "cuda"
        if env.distributed and not self.manual_sync:
            model = nn.parallel.DistributedDataParallel(spark, device_ids=[env.device])
        elif self.manual_sync:
            dist_utils.broadcast_state(spark)
        if cfg.compile:
            model = torch.compile(model)
        spark.train()
        self.buffers = list(spark.buffers())

        code = EXIT_OK
        losses: list[tuple[int, float]] = []
        bad_streak = 0
        bar = progress(self.total_steps, start, env.is_main)
        step = start
        it = None
        t_last = time.perf_counter()
        with StopRequest(env.is_main) as stop:
            try:
                while step < self.total_steps:
                    epoch, in_epoch = divmod(step, self.steps_per_epoch)
                    if it is None or in_epoch == 0:
                        self.dataset.set_epoch(epoch)
                        self.sampler.set_epoch(epoch, in_epoch)
                        it = iter(self.loader)
                    lr = lr_at(step, self.total_steps, self.peak_lr, self.warmup_steps)
                    wd = wd_at(step, self.total_steps, cfg.weight_decay, cfg.weight_decay_end)
                    set_lr_and_wd(self.optimizer, lr, wd)
                    backup = [b.detach().clone() for b in self.buffers]
                    loss_sum, images = self.train_step(model, it)
                    flags = torch.tensor(
                        [
                            loss_sum,
                            0.0 if math.isfinite(loss_sum) else 1.0,
                            1.0 if stop.reason else 0.0,
                            float(images),
                        ],
                        dtype=torch.float64,
                    )
                    dist_utils.all_reduce_sum(flags)
                    loss = float(flags[0]) / env.world_size
                    finite = flags[1].item() == 0
                    step_done = False
                    if finite:
                        bad_streak = 0
                        grad_norm = self.apply_update()
                        step_done = True
                    else:
                        self.optimizer.zero_grad(set_to_none=True)
                        with torch.no_grad():  # undo what the bad forward did to BatchNorm statistics
                            for b, saved in zip(self.buffers, backup):
                                b.copy_(saved)
                        bad_streak += 1
                        if env.is_main:
                            warn(
                                f"non-finite loss at step {step + 1}; skipped this update "
                                f"({bad_streak} in a row, stopping at {cfg.max_bad_steps})"
                            )
                        if bad_streak >= cfg.max_bad_steps:
                            where = (
                                f"the last good checkpoint is {ckpt.latest_checkpoint(self.ckpt_dir)}"
                                if ckpt.latest_checkpoint(self.ckpt_dir)
                                else "no checkpoint was written yet"
                            )
                            self.say(
                                f"{PROG}: error: the loss was not finite for {bad_streak} steps in a row "
                                f"(steps {step + 2 - bad_streak}-{step + 1}); stopping. {where}. Try a lower "
                                "--base-lr, --precision fp32, or check the data.",
                                file=sys.stderr,
                            )
                            code = EXIT_FAILED
                            break
                    step += 1
                    if step_done:
                        now = time.perf_counter()
                        ips = float(flags[3]) / max(1e-9, now - t_last)
                        t_last = now
                        if self.first_loss is None:
                            self.first_loss = loss
                        losses.append((step, loss))
                        if env.is_main:
                            bar.update(1)
                            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                            if step % cfg.log_every == 0 or step == self.total_steps or step == start + 1:
                                self.logger.log(
                                    step,
                                    {
                                        "loss": loss,
                                        "lr": lr,
                                        "weight_decay": wd,
                                        "grad_norm": grad_norm,
                                        "epoch": step / self.steps_per_epoch,
                                        "images_per_s": ips,
                                        "skipped_files": self.skipped.count,
                                    },
                                )
                    else:
                        t_last = time.perf_counter()
                        if env.is_main:
                            bar.update(1)
                    stopping = bool(flags[2].item() > 0)
                    periodic = (step % self.save_every == 0 or step == self.total_steps) and bad_streak == 0
                    if periodic or stopping:
                        self.save(step)
                    if stopping:
                        bar.close()
                        self.say(
                            f"stopped by {stop.reason or 'another process'} "
                            f"at step {step}/{self.total_steps}; "
                            f"checkpoint saved in {self.ckpt_dir}; run the same command again to resume"
                        )
                        code = EXIT_INTERRUPTED
                        break
            finally:
                bar.close()
                it = None

        if code == EXIT_OK:
            outputs = self.finish_outputs()
            self.summary(outputs, losses)
        if self.logger is not None:
            self.logger.close()
        return code

    def train_step(self, model: nn.Module, it: Any) -> tuple[float, int]:
        """Forward and backward over ``accum`` micro-batches; returns (mean loss, images on this rank)."""
        cfg, env = self.cfg, self.env
        total = 0.0
        images = 0
        for micro in range(cfg.accum):
            x, _, bad = next(it)
            if bad:
                self.skipped.update(bad, report=True)
            global_micro = self.sampler.local_batch * env.world_size
            from sparsify.masking import random_mask

            mask = random_mask(global_micro, self.grid, self.mask_ratio, generator=self.mask_gen)
            lo = env.rank * self.sampler.local_batch
            mask = mask[lo : lo + self.sampler.local_batch]
            x = x.to(env.device, non_blocking=True)
            mask = mask.to(env.device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            sync = contextlib.nullcontext()
            if env.distributed and micro < cfg.accum - 1 and hasattr(model, "no_sync"):
                sync = model.no_sync()
            autocast = (
                torch.autocast(env.device.type, dtype=self.autocast_dtype)
                if self.autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with sync:
                with autocast:
                    loss = model(x, mask=mask)
                scaled = loss.float() / cfg.accum
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            total += float(loss.detach()) / cfg.accum
            images += x.shape[0]
        return total, images

    def apply_update(self) -> float:
        """Clip, step, zero; returns the gradient norm before clipping."""
        if self.manual_sync:
            dist_utils.average_gradients(self.params)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.clip_grad if self.cfg.clip_grad and self.cfg.clip_grad > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # ---- messages
    def header(self, start: int) -> None:
        cfg = self.cfg
        procs = f"{self.env.world_size} processes" if self.env.distributed else "1 process"
        epochs = self.total_steps / self.steps_per_epoch
        self.say(f"{PROG}: {cfg.model} on {self.data_desc}, {format_size(cfg.input_size)} px")
        self.say(
            f"  SparK: patch {cfg.input_size[0] // self.grid[0]} px -> "
            f"{self.grid[0]}x{self.grid[1]} patches, "
            f"mask ratio {self.mask_ratio} ({self.visible} visible), decoder width {cfg.decoder_width}"
        )
        self.say(
            f"  {self.total_steps} steps (~{epochs:.3g} epochs of {self.steps_per_epoch} steps), batch "
            f"{cfg.batch_size}{f' ({cfg.accum} micro-steps)' if cfg.accum > 1 else ''}, peak lr "
            f"{self.peak_lr:.3g}, warm-up {self.warmup_steps} steps, {cfg.opt} betas "
            f"{betas_for_norm(self.norm_type)}, wd {cfg.weight_decay}->{cfg.weight_decay_end}, "
            f"drop path {self.drop_path}"
        )
        self.say(
            f"  {cfg.precision}{' channels_last' if cfg.channels_last else ''}"
            f"{' compiled' if cfg.compile else ''} on {self.env.device}, {procs}, "
            f"{self.workers} data workers; "
            f"out: {self.out}"
        )
        if start:
            self.say(f"  resuming from {self.resume_from} at step {start}")
        if cfg.preset == "demo" and cfg.data is None:
            self.say(
                "  (no --data: the quick demo settings. For real runs pass --data DIR; "
                "the defaults then follow "
                "the SparK paper: resnet50, 224 px, batch 4096, 1600 epochs, base lr 2e-4, decoder width 768)"
            )

    def summary(self, outputs: dict[str, Path], losses: list[tuple[int, float]]) -> None:
        if not self.env.is_main:
            return
        if losses:
            first_step, first = losses[0]
            last_step, last = losses[-1]
            tail = [v for _, v in losses[-10:]]
            head = [v for _, v in losses[:10]]
            self.say(
                f"loss: first {first:.4f} (step {first_step}) -> last {last:.4f} (step {last_step}); "
                f"mean of first {len(head)}: {sum(head) / len(head):.4f}, of last {len(tail)}: "
                f"{sum(tail) / len(tail):.4f}"
            )
        if self.skipped.count:
            self.say(f"skipped {self.skipped.count} unreadable image file(s)")
        latest = ckpt.latest_checkpoint(self.ckpt_dir)
        self.say(f"outputs in {self.out}/:")
        pictures = [n for n in ("recon_start.png", "recon_end.png") if (self.out / n).is_file()]
        rows = [
            ("backbone.safetensors", "pretrained weights of your model (original names, no head)"),
            (str(latest.relative_to(self.out)) if latest else "checkpoints/", "full checkpoint (resume)"),
            ("metrics.jsonl", "one JSON row per step"),
            ("tensorboard/", f"TensorBoard events (tensorboard --logdir {self.out})"),
            (", ".join(pictures), "reconstructions: input | masked | composite"),
            ("loss_curve.png", "loss against step"),
        ]
        for name, what in rows:
            if name and (self.out / name.split(",")[0]).exists():
                self.say(f"  {name:32s} {what}")
        spec = self.cfg.model
        if ":" not in spec or spec.startswith("timm:"):
            name = spec.split(":", 1)[-1]
            self.say(
                f"load it: timm.create_model('{name}', pretrained=True, num_classes=0, "
                f"pretrained_cfg_overlay=dict(file='{self.out / 'backbone.safetensors'}'))"
                "  (num_classes=0: no head; pass your own class count for a new head)"
            )


def _find_resume(cfg_out: Path, resume: str) -> Path | None:
    if resume in ("auto", ""):
        return ckpt.latest_checkpoint(cfg_out / "checkpoints")
    if resume in ("never", "no", "none", "false"):
        if ckpt.latest_checkpoint(cfg_out / "checkpoints") is not None:
            raise RecipeError(
                f"--resume never, but '{cfg_out}' already holds checkpoints; choose another --out or delete that folder"
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


def _pretrain(argv: Sequence[str] | None) -> int:
    quiet_known_warnings()
    args = build_parser().parse_args(argv)
    explicit = _explicit(args)
    if "input_size" in explicit:
        parse_size(explicit["input_size"])
    out = Path(explicit.get("out") or default_out(explicit))
    resume_path = _find_resume(out, str(args.resume))
    saved_state: dict | None = None
    saved_cfg: dict | None = None
    if resume_path is not None:
        saved_state, resume_path = ckpt.load_checkpoint(resume_path)
        saved_cfg = dict(saved_state.get("config") or {})
        saved_cfg.pop("out", None)
        for key in _SHAPE_KEYS:
            if key in explicit and key in saved_cfg:
                mine = parse_size(explicit[key]) if key == "input_size" else explicit[key]
                theirs = tuple(saved_cfg[key]) if key == "input_size" else saved_cfg[key]
                if mine != theirs:
                    raise RecipeError(
                        f"'{out}' holds a run with {key.replace('_', '-')}={saved_cfg[key]!r}, "
                        "but this command asks "
                        f"for {explicit[key]!r}; use another --out for a new run (or --resume never)"
                    )
    explicit["out"] = str(out)
    cfg = resolve_config(explicit, saved_cfg)
    env = dist_utils.setup(cfg.device)
    try:
        trainer = Pretrainer(cfg, env, resume_path, saved_state)
        return trainer.run(explicit)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        dist_utils.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sparsify-pretrain`` (or ``python -m sparsify.recipes.pretrain``): the exit code."""
    return run_main(PROG, lambda: _pretrain(argv))


if __name__ == "__main__":
    sys.exit(main())
