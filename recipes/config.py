"""Configuration of ``sparsify-pretrain``: presets, the command line, and resolving the final settings.

Nothing here imports torch or timm (``--help`` and argument errors should be instant); the model-name
helpers are imported only when a default run folder has to be named.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from .cli import RecipeError, parse_size

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
    "dist_timeout": 30.0,
}

# Settings that fix the shapes of the saved state: a resumed run may not change them.
SHAPE_KEYS = ("model", "input_size", "in_chans", "decoder_width", "densify_norm")


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
    dist_timeout: float

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
    r.add_argument(
        "--dist-timeout",
        type=float,
        help="minutes a process waits for the others in a collective before the run fails (torchrun; default 30)",
    )
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


def explicit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user actually gave on the command line."""
    return {k: v for k, v in vars(args).items() if v is not None and k != "resume"}


def default_out(explicit: dict[str, Any]) -> Path:
    """``runs/<model>-<data>`` for the settings given (before resume merging)."""
    from .models import model_slug  # deferred: imports torch

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
        (cfg.dist_timeout > 0, f"--dist-timeout must be > 0 minutes, got {cfg.dist_timeout}"),
    ]
    for ok, message in checks:
        if not ok:
            raise RecipeError(message)
