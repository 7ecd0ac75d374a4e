"""``sparsify-finetune``: check that pretraining helped - fine-tune or linearly probe a backbone.

Trains a classifier on a labelled ImageFolder (one sub-folder per class) starting from an exported
backbone (``--init runs/<name>/backbone.safetensors``), and reports top-1 (and top-5) accuracy on the
validation images after every epoch. Only the classification head may be missing from the backbone
file; any other mismatch is an error.

* Fine-tuning (default): AdamW, lr = base-lr x batch/256, warm-up then cosine, label smoothing 0.1,
  RandomResizedCrop + flip augmentation, no weight decay on 1-D parameters and biases.
* Linear probing (``--linear-probe``): the backbone is frozen (BatchNorm statistics included) and only
  the classifier is trained, with SGD + momentum.

Validation data: ``DIR/val`` when ``DIR/train`` and ``DIR/val`` exist, else ``--val DIR``, else a
deterministic per-class split of ``--val-fraction`` of the images.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as dist_utils
from .cli import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    RecipeError,
    format_size,
    parse_size,
    quiet_known_warnings,
    run_main,
)
from .data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    GlobalBatchSampler,
    ImageFiles,
    RandomResizedCropFlip,
    SkipCounter,
    collate_images,
    estimate_channel_stats,
    find_labelled_images,
    sample_seed,
)
from .logs import RunLogger, progress
from .models import build_model, classifier_names, head_prefixes, load_init, model_slug
from .optim import param_groups, set_lr_and_wd
from .schedules import lr_at

__all__ = ["CenterCrop", "build_parser", "main", "split_train_val"]

PROG = "sparsify-finetune"


class CenterCrop:
    """Evaluation transform: resize so the crop is ``crop_ratio`` of the short side, centre-crop."""

    def __init__(
        self,
        size: tuple[int, int],
        crop_ratio: float = 0.875,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.size = size
        self.crop_ratio = crop_ratio
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        th, tw = self.size
        scale = max(th / (h * self.crop_ratio), tw / (w * self.crop_ratio))
        nh, nw = max(th, int(round(h * scale))), max(tw, int(round(w * scale)))
        out = F.interpolate(img.unsqueeze(0), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        top, left = (nh - th) // 2, (nw - tw) // 2
        out = out[0, :, top : top + th, left : left + tw].clamp(0.0, 1.0)
        return (out - self.mean) / self.std


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
    """The command line of ``sparsify-finetune``."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Fine-tune or linearly probe a (SparK-pretrained) backbone on a labelled ImageFolder and "
        "report top-1 accuracy per epoch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="ImageFolder: one sub-folder per class (or train/ and val/ inside)")
    p.add_argument("--val", help="separate validation ImageFolder (default: DIR/val, else a split of --data)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each class held out when splitting")
    p.add_argument("--model", default="resnet50", help="timm name, torchvision:NAME or package.module:function")
    p.add_argument(
        "--init",
        help="backbone weights (e.g. runs/<name>/backbone.safetensors); only the head may be "
        "missing. Without it the model starts from random weights (a baseline)",
    )
    p.add_argument("--in-chans", type=int, help="input channels (default: the model's own)")
    p.add_argument("--linear-probe", action="store_true", help="freeze the backbone, train only the classifier")
    p.add_argument("--input-size", default="224", help="224 or HxW")
    p.add_argument("--epochs", type=int, default=100, help="training epochs")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size")
    p.add_argument("--base-lr", type=float, help="lr per 256 images (default 1e-3 fine-tune, 0.1 linear probe)")
    p.add_argument("--lr", type=float, help="absolute peak learning rate (overrides --base-lr)")
    p.add_argument("--warmup", type=float, default=5.0, help="warm-up epochs")
    p.add_argument("--weight-decay", type=float, help="weight decay (default 0.05 fine-tune, 0 linear probe)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    p.add_argument("--crop-scale", default="0.08,1", help="RandomResizedCrop area range 'min,max'")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast precision")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--workers", type=int, help="data-loading workers per process")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--out", help="output folder (default runs/finetune-<model>-<data>)")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True, help="TensorBoard events")
    return p


def _first_conv_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return 3


def _parse_scale(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as err:
        raise RecipeError(f"--crop-scale must be 'min,max', got {text!r}") from err
    if not 0 < lo <= hi <= 1:
        raise RecipeError(f"--crop-scale must satisfy 0 < min <= max <= 1, got {text!r}")
    return lo, hi


def _finetune(argv: Sequence[str] | None) -> int:
    quiet_known_warnings()
    args = build_parser().parse_args(argv)
    size = parse_size(args.input_size)
    if args.epochs < 1 or args.batch_size < 1:
        raise RecipeError("--epochs and --batch-size must be >= 1")
    if not 0.0 < args.val_fraction < 1.0:
        raise RecipeError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    data = Path(args.data).expanduser()
    if (data / "train").is_dir() and (data / "val").is_dir() and args.val is None:
        train_paths, train_labels, classes = find_labelled_images(data / "train")
        val_paths, val_labels, val_classes = find_labelled_images(data / "val")
        val_split = f"'{data / 'val'}'"
    elif args.val is not None:
        train_paths, train_labels, classes = find_labelled_images(data)
        val_paths, val_labels, val_classes = find_labelled_images(args.val)
        val_split = f"'{args.val}'"
    else:
        paths, labels, classes = find_labelled_images(data)
        (train_paths, train_labels), (val_paths, val_labels) = split_train_val(
            paths, labels, args.val_fraction, args.seed
        )
        val_classes = classes
        val_split = f"{args.val_fraction:.0%} of each class"
    if val_classes != classes:
        raise RecipeError(f"train classes {classes} and validation classes {val_classes} differ")
    if not val_paths:
        raise RecipeError("no validation images: give each class at least two images, or pass --val DIR")

    env = dist_utils.setup(args.device)
    say = (lambda *a, **k: print(*a, **k, flush=True)) if env.is_main else (lambda *a, **k: None)
    try:
        torch.manual_seed(args.seed)
        model = build_model(args.model, num_classes=len(classes), in_chans=args.in_chans, drop_path=args.drop_path)
        head = head_prefixes(model)
        fresh: list[str] = []
        if args.init:
            fresh = load_init(model, args.init, allow_missing=head)
        channels = _first_conv_channels(model)
        if channels == 3:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            mean, std = estimate_channel_stats(paths=[str(p) for p in train_paths], channels=channels)
        scale = _parse_scale(args.crop_scale)
        train_ds = ImageFiles(
            train_paths,
            RandomResizedCropFlip(size, scale=scale, mean=mean, std=std),
            channels,
            train_labels,
            seed=args.seed,
        )
        train_ds.probe()
        val_ds = ImageFiles(val_paths, CenterCrop(size, mean=mean, std=std), channels, val_labels, seed=args.seed)

        if args.linear_probe:
            cls_names = classifier_names(model)
            trainable = {n for n, _ in model.named_parameters() if any(n.startswith(c + ".") for c in cls_names)}
            for n, p in model.named_parameters():
                p.requires_grad_(n in trainable)
            if not trainable:
                raise RecipeError(f"--linear-probe: cannot find {args.model}'s classifier")
        if env.distributed and not args.linear_probe:
            dist_utils.convert_dense_batchnorm(model, env.device)
        model.to(env.device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)

        sampler = GlobalBatchSampler(len(train_ds), args.batch_size, env.world_size, env.rank, 1, args.seed)
        workers = args.workers if args.workers is not None else (0 if env.device.type == "cpu" else 8)
        loader = torch.utils.data.DataLoader(
            train_ds,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=collate_images,
            pin_memory=env.device.type == "cuda",
        )
        val_idx = list(range(env.rank, len(val_ds), env.world_size))
        val_loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(val_ds, val_idx),
            batch_size=max(1, args.batch_size // env.world_size),
            num_workers=workers,
            collate_fn=collate_images,
            pin_memory=env.device.type == "cuda",
        )

        base_lr = args.base_lr if args.base_lr is not None else (0.1 if args.linear_probe else 1e-3)
        peak = args.lr if args.lr is not None else base_lr * args.batch_size / 256
        wd = args.weight_decay if args.weight_decay is not None else (0.0 if args.linear_probe else 0.05)
        groups = param_groups(model.named_parameters(), wd)
        if args.linear_probe:
            optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=peak, momentum=0.9, weight_decay=wd)
        else:
            optimizer = torch.optim.AdamW(groups, lr=peak, weight_decay=wd, betas=(0.9, 0.999))
        steps_per_epoch = sampler.steps_per_epoch
        total = args.epochs * steps_per_epoch
        warmup = min(total, int(round(args.warmup * steps_per_epoch)))
        ddp: nn.Module = model
        if env.distributed:
            ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[env.device] if env.device.type == "cuda" else None
            )
        if args.precision == "fp16" and env.device.type != "cuda":
            raise RecipeError("--precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
        amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
        scaler = torch.amp.GradScaler("cuda") if args.precision == "fp16" else None

        def autocast() -> Any:
            return torch.autocast(env.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

        out = Path(args.out or Path("runs") / f"finetune-{model_slug(args.model)}-{data.resolve().name}")
        mode = "linear probe" if args.linear_probe else "fine-tune"
        say(
            f"{PROG}: {mode} of {args.model} on {len(classes)} classes: {len(train_ds)} training images, "
            f"{len(val_ds)} validation images ({val_split}), {format_size(size)} px"
        )
        if args.init:
            say(f"  initialised from {args.init}; newly initialised: {', '.join(fresh) if fresh else 'nothing'}")
        else:
            say("  no --init: random initial weights (a from-scratch baseline)")
        say(
            f"  {args.epochs} epochs x {steps_per_epoch} steps, batch {args.batch_size}, peak lr {peak:.3g}, "
            f"wd {wd}, {args.precision} on {env.device}; out: {out}"
        )
        logger = RunLogger(out, tensorboard=args.tensorboard) if env.is_main else None
        if env.is_main:
            (out / "config.json").write_text(json.dumps(vars(args), indent=2) + "\n", encoding="utf-8")
        skipped = SkipCounter()
        best = (-1.0, 0)
        step = 0
        history: list[dict[str, float]] = []
        bar = progress(total, 0, env.is_main, desc=mode)
        try:
            for epoch in range(args.epochs):
                train_ds.set_epoch(epoch)
                sampler.set_epoch(epoch)
                _set_train_mode(model, args.linear_probe, classifier_names(model))
                t0 = time.perf_counter()
                loss_sum = torch.zeros(2, dtype=torch.float64)
                for x, y, bad in loader:
                    skipped.update(bad, report=env.is_main)
                    lr = lr_at(step, total, peak, warmup)
                    set_lr_and_wd(optimizer, lr, wd)
                    x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
                    if args.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with autocast():
                        logits = ddp(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
                    if not torch.isfinite(loss):
                        raise RecipeError(f"the loss became {float(loss)} at epoch {epoch + 1}; lower --base-lr")
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 5.0)
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 5.0)
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    loss_value = float(loss.detach())
                    loss_sum += torch.tensor([loss_value * x.shape[0], x.shape[0]], dtype=torch.float64)
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
                dist_utils.all_reduce_sum(loss_sum)
                train_loss = float(loss_sum[0] / loss_sum[1].clamp_min(1))
                metrics = _evaluate(model, val_loader, env, len(classes), autocast, args.channels_last)
                metrics.update(train_loss=train_loss, lr=lr, epoch_time_s=time.perf_counter() - t0)
                history.append(metrics)
                top5 = f"  top-5 {metrics['top5']:.2f}%" if "top5" in metrics else ""
                bar.clear()
                say(
                    f"epoch {epoch + 1}/{args.epochs}  train loss {train_loss:.4f}  "
                    f"val loss {metrics['val_loss']:.4f}"
                    f"  top-1 {metrics['top1']:.2f}%{top5}"
                )
                if logger is not None:
                    logger.log(epoch + 1, metrics)
                if env.is_main and metrics["top1"] > best[0]:
                    best = (metrics["top1"], epoch + 1)
                    _save_weights(model, out / "best.safetensors")
        except KeyboardInterrupt:
            bar.close()
            say(f"\n{PROG}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            bar.close()
        if env.is_main:
            _save_weights(model, out / "final.safetensors")
            if logger is not None:
                logger.close()
            if skipped.count:
                say(f"skipped {skipped.count} unreadable image file(s)")
            say(f"best top-1 {best[0]:.2f}% (epoch {best[1]}); final top-1 {history[-1]['top1']:.2f}%")
            tb = "tensorboard/, " if args.tensorboard else ""
            say(f"outputs in {out}/: metrics.jsonl, {tb}best.safetensors, final.safetensors")
        return EXIT_OK
    finally:
        dist_utils.cleanup()


def _set_train_mode(model: nn.Module, linear_probe: bool, cls_names: list[str]) -> None:
    if not linear_probe:
        model.train()
        return
    model.eval()  # frozen backbone: BatchNorm statistics stay as pretrained
    for name in cls_names:
        model.get_submodule(name).train()


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    loader: Any,
    env: dist_utils.DistEnv,
    num_classes: int,
    autocast: Any,
    channels_last: bool,
) -> dict[str, float]:
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top1, top5, count
    for x, y, _ in loader:
        x, y = x.to(env.device), y.to(env.device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x).float()
        sums[0] += float(F.cross_entropy(logits, y, reduction="sum"))
        k = min(5, num_classes)
        top = logits.topk(k, dim=1).indices
        sums[1] += float((top[:, 0] == y).sum())
        sums[2] += float((top == y[:, None]).any(dim=1).sum())
        sums[3] += x.shape[0]
    dist_utils.all_reduce_sum(sums)
    n = max(1.0, float(sums[3]))
    out = {"val_loss": float(sums[0]) / n, "top1": 100.0 * float(sums[1]) / n}
    if num_classes > 5:
        out["top5"] = 100.0 * float(sums[2]) / n
    return out


def _save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.safetensors")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sparsify-finetune`` (or ``python -m sparsify.recipes.finetune``): the exit code."""
    return run_main(PROG, lambda: _finetune(argv))


if __name__ == "__main__":
    sys.exit(main())
