"""``sparsify-finetune``: check that pretraining helped - fine-tune or linearly probe a backbone.

Trains a classifier on a labelled ImageFolder (one sub-folder per class) starting from an exported
backbone (``--init runs/<name>/backbone.safetensors``), and reports top-1 (and top-5) accuracy on the
validation images after every epoch. Only the classification head may be missing from the backbone
file; any other mismatch is an error.

* Fine-tuning (default): AdamW, warm-up then cosine, label smoothing 0.1, RandomResizedCrop + flip
  augmentation, no weight decay on 1-D parameters and biases.
* Linear probing (``--linear-probe``): the backbone is frozen (BatchNorm statistics included) and only
  the classifier is trained, with SGD + momentum.
* Peak lr: the square-root rule, ``base-lr x sqrt(batch/256)``, at least ``--min-lr`` (base 1e-3 and
  floor 1e-4 fine-tuning, 0.1 and 0.01 linear probing). The linear rule (``--lr-rule linear``) gives
  3.1e-5 at batch 8, with which a user's accuracy stayed flat (measurements in the README); the rule and
  the value are printed in the header.

Validation data: ``DIR/val`` when ``DIR/train`` and ``DIR/val`` exist, else ``--val DIR``, else a
deterministic per-class split of ``--val-fraction`` of the images.

The run folder behaves like pretraining's (:mod:`.run_folder`): one live run per folder (a lock), a
checkpoint every epoch (and every ``--save-every`` steps), automatic exact resume (``--resume``), and
SIGINT / SIGTERM save a checkpoint before exiting. ``--init backbone.safetensors`` alone is enough: the
model, input channels and input size are read from the header that ``export_backbone`` wrote.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .cli import EXIT_INTERRUPTED, EXIT_OK, RecipeError, parse_crop_scale, parse_size, quiet_known_warnings, run_main
from .data import CenterCrop, find_labelled_images, sample_seed
from .models import backbone_header
from .resume import check_resume
from .run_folder import RunFolder

__all__ = ["CenterCrop", "DEFAULTS", "build_parser", "label_subset", "main", "split_train_val"]

PROG = "sparsify-finetune"

# Values for flags left out (a resumed run keeps its own; model, in_chans and input size come from the
# --init file's header when it has one).
DEFAULTS: dict[str, Any] = {
    "val_fraction": 0.2,
    "model": "resnet50",
    "linear_probe": False,
    "input_size": "224",
    "epochs": 100,
    "warmup": 5.0,
    "label_smoothing": 0.1,
    "drop_path": 0.0,
    "crop_scale": "0.08,1",
    "precision": "fp32",
    "channels_last": False,
    "batch_size": 256,
    "seed": 0,
    "keep": 2,
    "save_minutes": 10.0,
    "tensorboard": True,
    "dist_timeout": 30.0,
    "max_bad_steps": 5,
}
# Settings that fix the saved state's shapes or meaning (no change on resume), and those noticed.
FIXED_KEYS = ("model", "in_chans", "input_size", "linear_probe", "labels_per_class", "label_fraction")
NOTICE_KEYS = ("batch_size", "seed", "base_lr", "lr", "lr_rule", "min_lr")
#: the peak-lr rule when none is given (runs saved before the rule existed used the linear one)
LR_RULE = "sqrt"


def label_subset(
    labels: Sequence[int], per_class: int | None = None, fraction: float | None = None, seed: int = 0
) -> list[int]:
    """Indices (sorted) of a stratified, seeded subset of labelled items.

    ``per_class`` items of each class (all of a smaller class), or ``fraction`` of each class (rounded, at
    least one). Each class is drawn in the order of its own seeded permutation, so for one seed a smaller
    budget is contained in a larger one.
    """
    if (per_class is None) == (fraction is None):
        raise ValueError("give exactly one of per_class and fraction")
    by_class: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(int(lab), []).append(i)
    keep: list[int] = []
    for lab, idx in sorted(by_class.items()):
        g = torch.Generator().manual_seed(sample_seed(seed, lab, -11))
        order = [idx[int(j)] for j in torch.randperm(len(idx), generator=g)]
        n = min(len(idx), per_class) if per_class is not None else max(1, round(len(idx) * float(fraction)))
        keep += order[:n]
    return sorted(keep)


def split_train_val(
    paths: list[Path], labels: list[int], fraction: float, seed: int
) -> tuple[tuple[list[Path], list[int]], tuple[list[Path], list[int]]]:
    """A deterministic per-class split: ``fraction`` of each class (at least one image) for validation."""
    by_class: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(lab, []).append(i)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for lab, idx in sorted(by_class.items()):
        g = torch.Generator().manual_seed(sample_seed(seed, lab, -7))
        order = [idx[int(j)] for j in torch.randperm(len(idx), generator=g)]
        n_val = max(1, int(round(len(idx) * fraction))) if len(idx) > 1 else 0
        val_idx += order[:n_val]
        train_idx += order[n_val:]
    train_idx.sort()
    val_idx.sort()
    return (
        ([paths[i] for i in train_idx], [labels[i] for i in train_idx]),
        ([paths[i] for i in val_idx], [labels[i] for i in val_idx]),
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``sparsify-finetune`` (every default is None; :data:`DEFAULTS` fills them in)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Fine-tune or linearly probe a (SparK-pretrained) backbone on a labelled ImageFolder and "
        "report top-1 accuracy per epoch.",
        epilog="defaults: " + ", ".join(f"{k}={v}" for k, v in DEFAULTS.items()),
    )
    p.add_argument("--data", required=True, help="ImageFolder: one sub-folder per class (or train/ and val/ inside)")
    p.add_argument("--val", help="separate validation ImageFolder (default: DIR/val, else a split of --data)")
    p.add_argument("--val-fraction", type=float, help="share of each class held out when splitting (0.2)")
    few = p.add_mutually_exclusive_group()
    few.add_argument(
        "--labels-per-class",
        type=int,
        help="train on N labelled images of each class only (a stratified subset drawn with --seed from the "
        "training images; validation is unchanged); the subset's files are listed in <out>/train_subset.txt",
    )
    few.add_argument("--label-fraction", type=float, help="train on this fraction of each class only (as above)")
    p.add_argument(
        "--model",
        help="timm name, torchvision:NAME or package.module:function (default: the one named in the --init "
        "file's header, else resnet50)",
    )
    p.add_argument(
        "--init",
        help="backbone weights (e.g. runs/<name>/backbone.safetensors); only the head may be "
        "missing. Without it the model starts from random weights (a baseline)",
    )
    p.add_argument("--in-chans", type=int, help="input channels (default: the --init file's, else the model's own)")
    p.add_argument(
        "--linear-probe", action="store_true", default=None, help="freeze the backbone, train only the classifier"
    )
    p.add_argument("--input-size", help="224 or HxW (default: the --init file's pretraining size, else 224)")
    p.add_argument("--epochs", type=int, help="training epochs (100)")
    p.add_argument("--steps", type=int, help="training length in optimiser steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, help="global batch size (256)")
    p.add_argument(
        "--lr-rule",
        choices=["sqrt", "linear"],
        help="peak lr = max(base-lr x sqrt(batch/256), min-lr) (sqrt, default: learns at small batches) or "
        "max(base-lr x batch/256, min-lr) (linear)",
    )
    p.add_argument("--base-lr", type=float, help="lr at batch 256 (default 1e-3 fine-tune, 0.1 linear probe)")
    p.add_argument("--min-lr", type=float, help="floor of the peak lr (default 1e-4 fine-tune, 0.01 linear probe)")
    p.add_argument("--lr", type=float, help="absolute peak learning rate (overrides the rule)")
    p.add_argument("--warmup", type=float, help="warm-up epochs (5)")
    p.add_argument("--weight-decay", type=float, help="weight decay (default 0.05 fine-tune, 0 linear probe)")
    p.add_argument("--label-smoothing", type=float, help="label smoothing (0.1)")
    p.add_argument("--drop-path", type=float, help="stochastic depth rate (0)")
    p.add_argument("--crop-scale", help="RandomResizedCrop area range 'min,max' (0.08,1)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="autocast precision (fp32)")
    p.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None, help="channels_last memory format"
    )
    p.add_argument("--workers", type=int, help="data-loading workers per process")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--seed", type=int, help="seed (0)")
    p.add_argument("--out", help="run folder (default runs/finetune-<model>-<data>)")
    p.add_argument(
        "--resume",
        default="auto",
        help="'auto' (continue from the newest checkpoint in the run folder), 'never', or a checkpoint file",
    )
    p.add_argument("--save-every", type=int, help="also checkpoint every N steps (default: every epoch only)")
    p.add_argument(
        "--save-minutes", type=float, help="also checkpoint when this many minutes passed since the last one (10)"
    )
    p.add_argument("--keep", type=int, help="checkpoints to keep (0 = all; 2)")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None, help="TensorBoard events")
    p.add_argument(
        "--dist-timeout", type=float, help="minutes a process waits for the others before the run fails (30)"
    )
    p.add_argument(
        "--max-bad-steps",
        type=int,
        help="a step whose loss, gradients or BatchNorm statistics are not finite is skipped (no update, BatchNorm "
        "statistics restored); stop after this many in a row (5)",
    )
    return p


def resolve_settings(explicit: dict[str, Any], saved: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge, by priority: explicit flags, a resumed run's settings, the --init file's header, defaults."""
    merged: dict[str, Any] = dict(DEFAULTS)
    init = explicit.get("init", (saved or {}).get("init"))
    merged.update(backbone_header(init))
    if saved:
        merged.setdefault("lr_rule", "linear" if "lr_rule" not in saved else None)  # what the run was started with
        merged.update({k: v for k, v in saved.items() if v is not None})
        if "steps" in explicit or "epochs" in explicit:  # a new length replaces the old one
            merged.pop("steps", None)
    merged.update(explicit)
    merged.setdefault("in_chans", None)
    for key in ("steps", "base_lr", "min_lr", "lr", "weight_decay", "save_every", "workers", "device", "val", "init"):
        merged.setdefault(key, None)
    merged.setdefault("labels_per_class", None)
    merged.setdefault("label_fraction", None)
    if merged.get("lr_rule") is None:
        merged["lr_rule"] = LR_RULE
    return merged


def _validate(s: dict[str, Any]) -> None:
    checks = [
        (s["epochs"] >= 1, f"--epochs must be >= 1, got {s['epochs']}"),
        (s["steps"] is None or s["steps"] >= 1, f"--steps must be >= 1, got {s['steps']}"),
        (s["batch_size"] >= 1, f"--batch-size must be >= 1, got {s['batch_size']}"),
        (0.0 < s["val_fraction"] < 1.0, f"--val-fraction must be in (0, 1), got {s['val_fraction']}"),
        (s["save_every"] is None or s["save_every"] >= 1, f"--save-every must be >= 1, got {s['save_every']}"),
        (s["save_minutes"] >= 0, f"--save-minutes must be >= 0, got {s['save_minutes']}"),
        (s["dist_timeout"] > 0, f"--dist-timeout must be > 0 minutes, got {s['dist_timeout']}"),
        (
            s["labels_per_class"] is None or s["labels_per_class"] >= 1,
            f"--labels-per-class must be >= 1, got {s['labels_per_class']}",
        ),
        (
            s["label_fraction"] is None or 0 < s["label_fraction"] <= 1,
            f"--label-fraction must be in (0, 1], got {s['label_fraction']}",
        ),
        (
            s["labels_per_class"] is None or s["label_fraction"] is None,
            "give --labels-per-class or --label-fraction, not both",
        ),
        (s["max_bad_steps"] >= 1, f"--max-bad-steps must be >= 1, got {s['max_bad_steps']}"),
    ]
    for ok, message in checks:
        if not ok:
            raise RecipeError(message)
    parse_size(s["input_size"])
    parse_crop_scale(s["crop_scale"])


def _labelled_data(s: dict[str, Any]) -> dict[str, Any]:
    """Training and validation file lists, by the rules in the module docstring."""
    data = Path(s["data"]).expanduser()
    if (data / "train").is_dir() and (data / "val").is_dir() and s["val"] is None:
        train_paths, train_labels, classes = find_labelled_images(data / "train")
        val_paths, val_labels, val_classes = find_labelled_images(data / "val")
        val_split = f"'{data / 'val'}'"
    elif s["val"] is not None:
        train_paths, train_labels, classes = find_labelled_images(data)
        val_paths, val_labels, val_classes = find_labelled_images(s["val"])
        val_split = f"'{s['val']}'"
    else:
        paths, labels, classes = find_labelled_images(data)
        (train_paths, train_labels), (val_paths, val_labels) = split_train_val(
            paths, labels, s["val_fraction"], s["seed"]
        )
        val_classes = classes
        val_split = f"{s['val_fraction']:.0%} of each class"
    if val_classes != classes:
        raise RecipeError(f"train classes {classes} and validation classes {val_classes} differ")
    if not val_paths:
        raise RecipeError("no validation images: give each class at least two images, or pass --val DIR")
    subset = None
    if s["labels_per_class"] is not None or s["label_fraction"] is not None:
        keep = label_subset(train_labels, s["labels_per_class"], s["label_fraction"], s["seed"])
        budget = (
            f"{s['labels_per_class']} per class"
            if s["labels_per_class"] is not None
            else f"{s['label_fraction']:g} of each class"
        )
        subset = (
            f"a labelled subset of {len(keep)} of the {len(train_paths)} training images ({budget}, seed {s['seed']})"
        )
        train_paths, train_labels = [train_paths[i] for i in keep], [train_labels[i] for i in keep]
    return {
        "subset": subset,
        "train": (train_paths, train_labels),
        "val": (val_paths, val_labels),
        "classes": classes,
        "val_split": val_split,
    }


def default_out(s: dict[str, Any]) -> Path:
    """``runs/finetune-<model>-<data>``."""
    from .models import model_slug

    return Path("runs") / f"finetune-{model_slug(s['model'])}-{Path(s['data']).expanduser().resolve().name}"


def _finetune(argv: Sequence[str] | None) -> int:
    quiet_known_warnings()
    args = build_parser().parse_args(argv)
    explicit = {k: v for k, v in vars(args).items() if v is not None and k != "resume"}
    first = resolve_settings(explicit)
    _validate(first)
    if args.init and "model" not in explicit and "model" not in backbone_header(args.init):
        raise RecipeError(
            f"'{args.init}' does not say which model it belongs to (no sparsify header); pass --model as well"
        )
    folder = RunFolder(explicit.get("out") or default_out(first))
    main_process = os.environ.get("RANK", "0") == "0"
    if main_process:
        folder.check_writable()
        folder.lock()
    code = None
    try:
        code = _locked_finetune(args, explicit, folder, main_process)
        return code
    finally:  # a run that failed before its first step leaves no folder behind
        folder.close(failed=code != EXIT_OK, say=lambda line: print(f"{PROG}: {line}", file=sys.stderr, flush=True))


def _locked_finetune(args: Any, explicit: dict[str, Any], folder: RunFolder, main_process: bool) -> int:
    from . import checkpoint as ckpt
    from . import distributed as dist_utils
    from .finetune_loop import FINETUNE_FORMAT, Finetuner

    resume_path = folder.find_resume(str(args.resume))
    state: dict | None = None
    saved: dict | None = None
    if resume_path is not None:
        state, resume_path = ckpt.load_checkpoint(resume_path, expected_format=FINETUNE_FORMAT)
        saved = dict(state.get("config") or {})
        saved.pop("out", None)
        for line in check_resume(folder.out, explicit, saved, state.get("resolved") or {}, FIXED_KEYS, NOTICE_KEYS):
            if main_process:
                print(line, flush=True)
    s = resolve_settings(explicit, saved)
    _validate(s)
    s["out"] = str(folder.out)
    data = _labelled_data(s)
    if data["subset"] and main_process:  # which images the run trained on, to repeat or compare it
        lines = [f"{data['classes'][lab]}\t{path}" for path, lab in zip(*data["train"])]
        (folder.out / "train_subset.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    finished = False  # every rank got to the end: they can meet once more before tearing down
    env = dist_utils.setup(s["device"], timeout_minutes=s["dist_timeout"])
    try:
        code = Finetuner(s, env, folder, data, resume_path, state).run()
        finished = True
        return code
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        dist_utils.cleanup(finished)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sparsify-finetune`` (or ``python -m sparsify.recipes.finetune``): the exit code."""
    return run_main(PROG, lambda: _finetune(argv))


if __name__ == "__main__":
    sys.exit(main())
