"""Configuration of ``sparsify-pretrain``: presets, the command line, and resolving the final settings.

Nothing here imports torch or timm (``--help`` and argument errors should be instant); the model-name
helpers are imported only when a default run folder has to be named.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from .cli import RecipeError, parse_crop_scale, parse_input_size

__all__ = [
    "PROG",
    "PRESETS",
    "COMMON_DEFAULTS",
    "SHAPE_KEYS",
    "PretrainConfig",
    "build_parser",
    "explicit_settings",
    "default_out",
    "resolve_config",
]

PROG = "sparsify-pretrain"

# Values used for every setting the command line leaves out. "default" (with --data) is the paper's recipe
# at a batch one machine holds, with the learning rate scaled so that small batches still learn; "paper"
# is the SparK ImageNet recipe exactly (global batch 4096 reached by gradient accumulation where needed);
# "demo" (without --data) is a short CPU run on the photographs bundled with scikit-image.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "model": "resnet50",
        "input_size": "224",
        "epochs": 1600.0,
        "batch_size": None,  # one micro-batch per device, no accumulation
        "lr_rule": "sqrt",
        "base_lr": 8e-4,  # the paper's 3.2e-3 at batch 4096, square-root scaled to batch 256
        "min_lr": 1e-3,  # small batches: 2e-4 at batch 16 learns 5x slower than 1e-3 (README)
        "warmup": 40.0,
        "decoder_width": 768,
    },
    "paper": {
        "model": "resnet50",
        "input_size": "224",
        "epochs": 1600.0,
        "batch_size": 4096,
        "lr_rule": "linear",
        "base_lr": 2e-4,
        "min_lr": 0.0,
        "warmup": 40.0,
        "decoder_width": 768,
    },
    "demo": {
        "model": "resnet18",
        "input_size": "96",
        "steps": 100,
        "batch_size": 32,
        "lr_rule": "linear",
        "min_lr": 0.0,
        "base_lr": 0.24,  # lr 0.03 at batch 32: a short run needs large LAMB steps
        "warmup_steps": 10,
        "decoder_width": 128,
        "crop_scale": "0.2,1",
    },
    # 3-D (volumes): "volumes" is the offline default (--volumes without --data): the built-in small 3-D
    # ResNet on synthetic phantoms, a short CPU run; "scans" (a folder of volumes, detected or --preset) has
    # 3-D defaults: 64^3 crops, a few hundred epochs (scan folders hold hundreds of cases, not millions).
    "volumes": {
        "model": "sparsify.recipes.models:small_resnet3d",
        "input_size": "32",
        "steps": 60,
        "batch_size": 8,
        "lr_rule": "linear",
        "min_lr": 0.0,
        "base_lr": 0.32,  # lr 0.01 at batch 8: a short run needs large LAMB steps
        "warmup_steps": 6,
        "decoder_width": 64,
        "sample_length": 64,
    },
    "scans": {
        "model": "sparsify.recipes.models:small_resnet3d",
        "input_size": "64",
        "epochs": 400.0,
        "batch_size": None,  # one micro-batch per device
        "lr_rule": "sqrt",
        "base_lr": 8e-4,
        "min_lr": 1e-3,
        "warmup": 20.0,
        "decoder_width": 128,  # 3-D decoder blocks cost width^2 x 27: 256 would be 10x a 1M-parameter network
    },
}

#: the presets of 3-D runs (volumes)
VOLUME_PRESETS = ("volumes", "scans")

# Settings shared by both presets (design.md section 7 where it says).
COMMON_DEFAULTS: dict[str, Any] = {
    "weight_decay": 0.04,
    "weight_decay_end": 0.2,
    "clip_grad": 5.0,
    "precision": "fp32",
    "channels_last": False,
    "compile": False,
    "seed": 0,
    "keep": 2,  # the newest checkpoint and one fallback: each holds the model and the optimiser state
    "densify_norm": "auto",
    "opt": "lamb",
    "crop_scale": "0.67,1",
    "max_bad_steps": 5,
    "spike_factor": 4.0,
    "on_divergence": "stop",
    "rollback_lr_factor": 0.5,
    "max_rollbacks": 3,
    "log_every": 1,
    "vis_images": 8,
    "sample_length": 576,
    "tensorboard": True,
    "dist_timeout": 30.0,
    "knn_k": 20,
    "save_minutes": 10.0,  # a short or killed run keeps what it did (the step interval alone may be 1000 steps)
    "small_volumes": "pad",
}

#: How the peak learning rate follows the global batch B when --lr is not given.
LR_RULES = {
    "linear": "lr = base-lr x B/256 (the paper's rule)",
    "sqrt": "lr = base-lr x sqrt(B/256) (square-root scaling)",
}
#: the healthy-loss and good-checkpoint rule (recipes/divergence.py), for --help
DIVERGENCE_TEXT = (
    "A step's loss is healthy when it is finite and at most --spike-factor times the median of the last 20 "
    "healthy losses. A bad step (loss not healthy, or non-finite gradients or BatchNorm statistics) is skipped: "
    "no update, BatchNorm statistics restored. A checkpoint is written only after the loss of its own weights "
    "(the next step's) was found healthy, so every checkpoint in the run folder is good and --resume auto "
    "continues from the newest (checkpoints written at a stop or at the end are written as they are). "
    "--max-bad-steps bad steps in a row are divergence."
)

#: applied after either rule
LR_FLOOR_TEXT = "then at least --min-lr (1e-3 by default with --data, 0 in the paper and demo presets)"

# Settings that fix the shapes of the saved state: a resumed run may not change them.
SHAPE_KEYS = ("model", "input_size", "in_chans", "decoder_width", "densify_norm", "volumes")


@dataclasses.dataclass
class PretrainConfig:
    """Every resolved setting of a pretraining run (stored in its checkpoints)."""

    model: str
    data: str | None
    input_size: tuple[int, ...]
    in_chans: int | None
    epochs: float | None
    steps: int | None
    batch_size: int | None
    micro_batch: int | None
    lr_rule: str
    min_lr: float
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
    accum: int | None
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
    dist_timeout: float
    knn_data: str | None = None
    knn_every: int | None = None
    knn_k: int = 20
    vis_every: int | None = None
    spike_factor: float = 4.0
    on_divergence: str = "stop"
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    save_minutes: float = 10.0
    volumes: bool = False  # 3-D volumes (a scan folder or the synthetic default) rather than images
    intensity: str | None = None  # volumes: the intensity rule (recipes/volumes.py parse_intensity)
    small_volumes: str = "pad"  # volumes smaller than the crop: pad with the background, or refuse
    volume_cache: str | None = None  # volumes: decompressed-voxel cache folder ("none": no cache)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        d["crop_scale"] = list(self.crop_scale)
        return d


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``sparsify-pretrain`` (every default is None; presets fill them in)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "SparK masked pretraining (arXiv 2301.03580) for any CNN. With no arguments: a short CPU demo "
            "(resnet18, 96 px, 100 steps) on photographs bundled with scikit-image. With --data: the paper's "
            "recipe (resnet50, 224 px, 1600 epochs, LAMB, 40 warm-up epochs, wd 0.04->0.2, mask 0.6) at the "
            "batch one device holds (--micro-batch), with the peak lr square-root scaled from the paper's "
            "and at least 1e-3 so that small batches still learn (max(8e-4 x sqrt(batch/256), 1e-3): 1e-3 up "
            "to batch 400, 1.6e-3 at 1024, 3.2e-3 at 4096 as in the paper). --preset paper is the paper's "
            "recipe exactly: global batch 4096 (gradient accumulation over micro-batches that fit), lr 2e-4 x "
            "batch/256. Override any of it with the flags below."
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
        help="training resolution (crop): N (a square for images, a cube for volumes), HxW for images or DxHxW "
        "for volumes (multiples of the model's downsample ratio per axis, 32 for most 2-D CNNs)",
    )
    d.add_argument(
        "--volumes",
        action="store_true",
        default=None,
        help="train on 3-D volumes: without --data, the offline default (a small 3-D ResNet on synthetic "
        "phantoms, no download); with --data, read the folder as volumes (detected anyway when it holds "
        ".nii/.nii.gz/.npy/.npz files or DICOM series)",
    )
    d.add_argument(
        "--intensity",
        help="volumes: per-volume intensity rule: percentile (default: clip to the 0.5/99.5 percentiles of the "
        "foreground, then z-score), percentile:LO,HI, ct:L,H (a window in HU scaled to [0,1]), ct:lung, "
        "ct:soft, ct:bone, ct:brain, or none",
    )
    d.add_argument(
        "--small-volumes",
        choices=["pad", "refuse"],
        help="volumes smaller than the crop: pad (default: with the background value, counted in the header) "
        "or refuse (stop naming the file)",
    )
    d.add_argument(
        "--volume-cache",
        help="volumes: folder caching decompressed voxels as .npy (default: <out>/volume_cache; 'none' = off)",
    )
    d.add_argument("--crop-scale", help="RandomResizedCrop area range 'min,max' (paper 0.67,1)")
    d.add_argument("--workers", type=int, help="data-loading worker processes per rank")
    d.add_argument("--sample-length", type=int, help="samples per epoch of the embedded default data")
    t = p.add_argument_group("schedule")
    t.add_argument("--epochs", type=float, help="training length in epochs (paper 1600)")
    t.add_argument("--steps", type=int, help="training length in optimiser steps (overrides --epochs)")
    t.add_argument(
        "--batch-size",
        type=int,
        help="global batch per optimiser step, all processes together (default: one micro-batch per device; "
        "paper 4096)",
    )
    t.add_argument(
        "--micro-batch",
        type=int,
        help="images per device per forward/backward (default: the most that fits: probed on CUDA, 32 on CPU); "
        "a larger --batch-size is reached by gradient accumulation",
    )
    t.add_argument("--accum", type=int, help="micro-steps per optimiser step (default: from --micro-batch)")
    t.add_argument(
        "--lr-rule",
        choices=sorted(LR_RULES),
        help="peak lr from the batch B: linear = base-lr x B/256 (paper, --preset paper), sqrt = base-lr x "
        "sqrt(B/256) (default with --data)",
    )
    t.add_argument("--base-lr", type=float, help="learning rate at batch 256 (default 8e-4 with sqrt; paper 2e-4)")
    t.add_argument(
        "--min-lr",
        type=float,
        help="lower bound on the peak lr from the rule (default 1e-3 with --data; paper and demo 0)",
    )
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
    r.add_argument(
        "--save-minutes",
        type=float,
        help="also checkpoint when this many minutes passed since the last checkpoint (10; 0 = only by steps)",
    )
    r.add_argument("--keep", type=int, help="checkpoints to keep (0 = all)")
    r.add_argument("--log-every", type=int, help="write metrics every N steps")
    r.add_argument("--vis-images", type=int, help="images in the reconstruction grids (0 = none)")
    r.add_argument(
        "--vis-every",
        type=int,
        help="write reconstructions to recon_latest.png (and TensorBoard) every N steps (default: 10 times a run); "
        "volumes: the three orthogonal planes through each volume's centre",
    )
    k = p.add_argument_group("k-NN monitor")
    k.add_argument(
        "--knn-data",
        help="labelled ImageFolder (one sub-folder per class, or train/ and val/ inside; a few hundred images): "
        "k-NN top-1 of the pooled features at step 0, every --knn-every steps and at the end. BatchNorm "
        "statistics are re-estimated on these images before each evaluation (the run's own are kept), so the "
        "score depends on the weights alone",
    )
    k.add_argument(
        "--knn-every",
        type=int,
        help="k-NN evaluation interval in steps (default: measured, so that it costs under 2%% of training time)",
    )
    k.add_argument("--knn-k", type=int, help="neighbours of the k-NN vote (20)")
    r.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None, help="TensorBoard events")
    v = p.add_argument_group("divergence", DIVERGENCE_TEXT)
    v.add_argument(
        "--spike-factor",
        type=float,
        help="a finite loss above this many times the median of the last 20 healthy losses is a spike (4; 0 = off)",
    )
    v.add_argument(
        "--max-bad-steps", type=int, help="bad steps (non-finite or spiking loss) in a row that mean divergence (5)"
    )
    v.add_argument(
        "--on-divergence",
        choices=["stop", "rollback"],
        help="stop (default): end the run naming the checkpoint to resume from and the flag to change; "
        "rollback: reload the newest checkpoint, scale the lr down, skip the batches since it, go on",
    )
    v.add_argument("--rollback-lr-factor", type=float, help="lr multiplier per rollback (0.5)")
    v.add_argument("--max-rollbacks", type=int, help="give up after this many rollbacks in one run (3)")
    r.add_argument(
        "--dist-timeout",
        type=float,
        help="minutes a process waits for the others in a collective before the run fails (torchrun; default 30)",
    )
    r.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="defaults to use: 'demo' without --data, 'default' with a folder of images, 'scans' with a folder "
        "of volumes, 'volumes' with --volumes and no --data; 'paper' = the paper's recipe exactly",
    )
    return p


def _epilog() -> str:
    lines = ["defaults for flags left out (an explicit flag always wins; a resumed run keeps its own):"]
    whens = {
        "demo": "without --data",
        "default": "with --data",
        "paper": "--preset paper",
        "volumes": "--volumes without --data",
        "scans": "--data with volumes",
    }
    for name, values in PRESETS.items():
        shown = ", ".join(f"{k}={'auto' if v is None else v}" for k, v in values.items())
        lines.append(f"  {name} ({whens.get(name, '--preset ' + name)}): {shown}")
    lines.append("  otherwise: " + ", ".join(f"{k}={v}" for k, v in COMMON_DEFAULTS.items()))
    lines.append(
        "  mask_ratio=0.6 (0.75 from 384 px); drop_path by model (paper values); warm-up at most 1/4 of the run"
    )
    lines.append("learning-rate rules (when --lr is not given), B = global batch:")
    for name, rule in LR_RULES.items():
        lines.append(f"  {name}: {rule}")
    lines.append(f"  {LR_FLOOR_TEXT}")
    lines.append("examples:")
    lines.append("  sparsify-pretrain                                  # the CPU demo")
    lines.append("  sparsify-pretrain --data ~/photos --model resnet18 --knn-data ~/labelled_photos")
    lines.append("  sparsify-pretrain --data ~/photos --model resnet50 --batch-size 256 --epochs 100")
    lines.append("  sparsify-pretrain --data /imagenet/train --preset paper   # batch 4096 by accumulation")
    lines.append("  sparsify-pretrain --volumes                        # 3-D: offline, synthetic volumes")
    lines.append("  sparsify-pretrain --data ~/scans --model net.py:build --input-size 96 --intensity ct:soft")
    lines.append("  torchrun --nproc-per-node 8 -m sparsify.recipes.pretrain --data /imagenet/train \\")
    lines.append("      --precision bf16 --channels-last --compile")
    return "\n".join(lines)


def explicit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user actually gave on the command line."""
    return {k: v for k, v in vars(args).items() if v is not None and k != "resume"}


def default_out(explicit: dict[str, Any]) -> Path:
    """``runs/<model>-<data>`` for the settings given (before resume merging)."""
    from .models import model_slug  # deferred: imports torch

    preset = explicit.get("preset") or _default_preset(explicit.get("data"), _is_volumes(explicit))
    model = explicit.get("model") or PRESETS[preset]["model"]
    data = explicit.get("data")
    data_name = Path(data).expanduser().resolve().name if data else "samples"
    return Path("runs") / f"{model_slug(model)}-{data_name or 'data'}"


def _is_volumes(settings: dict[str, Any]) -> bool:
    """Whether a run trains on volumes: ``--volumes``, a volume preset, or a ``--data`` folder holding volumes."""
    if settings.get("volumes") or settings.get("preset") in VOLUME_PRESETS:
        return True
    data = settings.get("data")
    if not data:
        return False
    root = Path(data).expanduser()
    if not root.is_dir():
        return False  # the missing folder is reported by the data step, with its own words
    from .volumes import looks_like_volumes  # deferred: only runs given --data pay for it

    return bool(looks_like_volumes(root))


def _default_preset(data: str | None, volumes: bool) -> str:
    if volumes:
        return "scans" if data else "volumes"
    return "default" if data else "demo"


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
        if {"batch_size", "micro_batch", "accum"} & set(explicit):  # the batch plan is worked out again
            merged.pop("accum", None)
            merged.pop("micro_batch", None)
    merged.update(explicit)
    volumes = bool(merged.get("volumes")) if saved and "volumes" in saved else _is_volumes(merged)
    merged["volumes"] = volumes
    preset = merged.get("preset") or _default_preset(merged.get("data"), volumes)
    if volumes != (preset in VOLUME_PRESETS) and "preset" in explicit:
        kind = "volumes" if volumes else "images"
        raise RecipeError(
            f"--preset {preset} is for {'volumes' if preset in VOLUME_PRESETS else 'images'}, but this run "
            f"trains on {kind}; use --preset {'scans' if volumes else 'default'}"
        )
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
    merged["input_size"] = parse_input_size(merged["input_size"], 3 if volumes else 2)
    merged["crop_scale"] = parse_crop_scale(merged["crop_scale"])
    merged["out"] = str(merged.get("out") or default_out(explicit))
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    values = {k: merged.get(k) for k in fields}
    cfg = PretrainConfig(**values)
    _validate(cfg)
    return cfg


def _validate(cfg: PretrainConfig) -> None:
    checks = [
        (cfg.batch_size is None or cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (cfg.micro_batch is None or cfg.micro_batch >= 1, f"--micro-batch must be >= 1, got {cfg.micro_batch}"),
        (cfg.accum is None or cfg.accum >= 1, f"--accum must be >= 1, got {cfg.accum}"),
        (
            cfg.accum is None or cfg.micro_batch is None,
            "give --micro-batch or --accum, not both (each follows from the other and --batch-size)",
        ),
        (cfg.lr_rule in LR_RULES, f"--lr-rule must be one of {sorted(LR_RULES)}, got {cfg.lr_rule!r}"),
        (cfg.min_lr is not None and cfg.min_lr >= 0, f"--min-lr must be >= 0, got {cfg.min_lr}"),
        (cfg.vis_every is None or cfg.vis_every >= 1, f"--vis-every must be >= 1, got {cfg.vis_every}"),
        (cfg.knn_every is None or cfg.knn_every >= 1, f"--knn-every must be >= 1, got {cfg.knn_every}"),
        (cfg.knn_k >= 1, f"--knn-k must be >= 1, got {cfg.knn_k}"),
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
        (
            cfg.spike_factor == 0 or cfg.spike_factor > 1,
            f"--spike-factor must be > 1 (or 0 = off), got {cfg.spike_factor}",
        ),
        (
            cfg.on_divergence in ("stop", "rollback"),
            f"--on-divergence must be stop or rollback, got {cfg.on_divergence!r}",
        ),
        (
            0 < cfg.rollback_lr_factor < 1,
            f"--rollback-lr-factor must be in (0, 1), got {cfg.rollback_lr_factor}",
        ),
        (cfg.max_rollbacks >= 1, f"--max-rollbacks must be >= 1, got {cfg.max_rollbacks}"),
        (cfg.log_every >= 1, f"--log-every must be >= 1, got {cfg.log_every}"),
        (cfg.save_every is None or cfg.save_every >= 1, f"--save-every must be >= 1, got {cfg.save_every}"),
        (cfg.save_minutes >= 0, f"--save-minutes must be >= 0, got {cfg.save_minutes}"),
        (cfg.in_chans is None or cfg.in_chans >= 1, f"--in-chans must be >= 1, got {cfg.in_chans}"),
        (cfg.dist_timeout > 0, f"--dist-timeout must be > 0 minutes, got {cfg.dist_timeout}"),
        (
            cfg.small_volumes in ("pad", "refuse"),
            f"--small-volumes must be pad or refuse, got {cfg.small_volumes!r}",
        ),
        (
            cfg.volumes or (cfg.intensity is None and cfg.volume_cache is None),
            "--intensity and --volume-cache are for volumes; this run trains on images (pass --volumes, or --data "
            "with .nii/.nii.gz/.npy/.npz files)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise RecipeError(message)
