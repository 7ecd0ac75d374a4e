"""``sparsify-reconstruct``: show what a pretraining run learned on your own images.

Give it a run folder (its newest checkpoint is used) or a checkpoint file, and some images or folders;
it writes one labelled PNG grid, a row per image: the input, the masked input (masked patches grey),
the prediction, and the prediction pasted into the visible input. The mask is drawn from ``--seed``, so
two checkpoints shown with the same seed hide the same patches and can be compared side by side.

Images are resized (short side) and centre-cropped to the run's training size (``--input-size`` to
change it), normalised as in training (ImageNet statistics for 3 channels; for other channel counts,
statistics estimated from the images shown).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cli import RecipeError, format_size, parse_size, quiet_known_warnings, run_main

__all__ = ["PROG", "build_parser", "load_spark", "main"]

PROG = "sparsify-reconstruct"
COLUMNS = ("input", "masked", "reconstruction", "composite")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``sparsify-reconstruct``."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Write a labelled grid of SparK reconstructions (input | masked input | prediction | prediction "
            "pasted into the visible input) for some images, from a sparsify-pretrain run folder or checkpoint."
        ),
        epilog=(
            "examples:\n"
            "  sparsify-reconstruct runs/resnet18-photos                   # the run's own data (or demo photos)\n"
            "  sparsify-reconstruct runs/resnet18-photos holiday/*.jpg --out recon.png --seed 3\n"
            "  sparsify-reconstruct runs/x/checkpoints/ckpt-00001000.pt DIR --mask-ratio 0.75"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", help="run folder (uses its newest checkpoint) or a checkpoint file")
    p.add_argument(
        "images",
        nargs="*",
        help="image files or folders (searched recursively); default: the run's --data, or the demo photographs",
    )
    p.add_argument("--out", help="PNG to write (default: <run folder>/reconstructions.png)")
    p.add_argument("--input-size", help="224 or HxW (default: the run's training size)")
    p.add_argument("--mask-ratio", type=float, help="fraction of patches masked (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mask (default 0: the same patches every time)")
    p.add_argument("--max-images", type=int, default=8, help="rows in the grid (default 8)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1 ...")
    return p


def _checkpoint_and_folder(run: str) -> tuple[Path, Path]:
    """(checkpoint file, run folder) for a run folder or a checkpoint file."""
    path = Path(run).expanduser()
    if not path.exists():
        raise RecipeError(f"'{run}' is neither a run folder nor a checkpoint file")
    from . import checkpoint as ckpt  # imports torch: only once the path exists

    if path.is_dir():
        found = ckpt.latest_checkpoint(path / "checkpoints") or ckpt.latest_checkpoint(path)
        if found is None:
            raise RecipeError(
                f"'{run}' holds no checkpoint (checkpoints/ckpt-*.pt); pass a run folder of sparsify-pretrain"
            )
        folder = path if (path / "checkpoints").is_dir() else path.parent
        return found, folder
    if not path.is_file():
        raise RecipeError(f"'{run}' is neither a run folder nor a checkpoint file")
    folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return path, folder


def load_spark(
    checkpoint: str | Path, device: str = "cpu", input_size: tuple[int, int] | None = None
) -> tuple[Any, dict]:
    """Rebuild the SparK model of a ``sparsify-pretrain`` checkpoint, in eval mode.

    Returns:
        (spark, config): the model with the checkpoint's weights, and the run's resolved settings.
    """
    import torch

    import sparsify

    from . import checkpoint as ckpt
    from .models import build_model, spec_from_run

    state, path = ckpt.load_checkpoint(checkpoint, fallback=False)
    cfg = dict(state.get("config") or {})
    if "model" not in cfg or "model" not in state:
        raise RecipeError(f"'{path}' has no model settings; is it a sparsify-pretrain checkpoint?")
    if cfg.get("volumes") or len(cfg.get("input_size") or ()) == 3:
        raise RecipeError(
            f"'{path}' is a 3-D (volume) run; {PROG} reconstructs images only. The run folder already holds "
            "its slice pictures (recon_start.png, recon_latest.png, recon_end.png: three planes through each "
            "volume's centre); in Python, SparK.reconstruct and sparsify.save_reconstructions draw any volumes"
        )
    size = tuple(input_size or cfg["input_size"])
    model = build_model(
        spec_from_run(cfg["model"], state.get("cwd")),
        in_chans=cfg.get("in_chans"),
        drop_path=float(cfg.get("drop_path") or 0.0),
    )
    enc = sparsify.wrap(model, input_size=tuple(cfg["input_size"]))
    mask_ratio = cfg.get("mask_ratio") or (0.75 if min(size) >= 384 else 0.6)
    spark = sparsify.SparK(
        enc,
        mask_ratio=mask_ratio,
        decoder_width=int(cfg["decoder_width"]),
        densify_norm=cfg.get("densify_norm", "auto"),
    )
    spark.load_state_dict(state["model"])
    spark.to(torch.device(device)).eval()
    cfg["input_size"] = list(size)
    return spark, cfg


def _image_paths(items: Sequence[str]) -> list[Path]:
    from .data import find_images

    paths: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            paths.extend(find_images(p))
        elif p.is_file():
            paths.append(p)
        else:
            raise RecipeError(f"no such image file or folder: '{item}'")
    return paths


def _load_images(args: argparse.Namespace, cfg: dict, channels: int) -> tuple[list[Any], str]:
    """Raw (C, H, W) images in [0, 1] and a description of where they came from."""
    from .cli import warn
    from .data import SampleImages, load_image

    items = list(args.images)
    if not items and cfg.get("data") and Path(cfg["data"]).is_dir():
        items = [cfg["data"]]
    if not items:
        photos = SampleImages(None, channels, length=1).images[: args.max_images]  # type: ignore[arg-type]
        return photos, f"{len(photos)} of the demo photographs"
    paths = _image_paths(items)
    # spread the choice over the whole folder, not only its first sub-folder
    if len(paths) > args.max_images:
        step = len(paths) / args.max_images
        paths = [paths[int(i * step)] for i in range(args.max_images)]
    images = []
    for p in paths:
        try:
            images.append(load_image(p, channels))
        except Exception as err:  # noqa: BLE001 - an unreadable file is skipped, not fatal
            warn(f"skipping unreadable image '{p}' ({type(err).__name__})")
    if not images:
        raise RecipeError(f"none of the {len(paths)} image file(s) could be read")
    return images, f"{len(images)} image(s) from {', '.join(items)}"


def _reconstruct(argv: Sequence[str] | None) -> int:
    quiet_known_warnings()
    args = build_parser().parse_args(argv)
    if args.max_images < 1:
        raise RecipeError(f"--max-images must be >= 1, got {args.max_images}")
    if args.mask_ratio is not None and not 0.0 < args.mask_ratio < 1.0:
        raise RecipeError(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
    size = parse_size(args.input_size) if args.input_size else None
    checkpoint, folder = _checkpoint_and_folder(args.run)

    import torch

    import sparsify

    from .data import CenterCrop, default_normalisation, estimate_channel_stats

    spark, cfg = load_spark(checkpoint, args.device, size)
    if args.mask_ratio is not None:
        spark.mask_ratio = float(args.mask_ratio)
    h, w = cfg["input_size"]
    r = spark.downsample_ratio
    if h % r or w % r:
        raise RecipeError(f"--input-size {format_size((h, w))} is not a multiple of the model's patch size {r}")
    images, where = _load_images(args, cfg, spark.in_chans)
    mean, std = default_normalisation(spark.in_chans) or estimate_channel_stats(images=images, channels=spark.in_chans)
    crop = CenterCrop((h, w), crop_ratio=1.0, mean=mean, std=std)
    x = torch.stack([crop(img) for img in images]).to(args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    mask = spark.draw_mask(x, generator=gen)
    out = spark.reconstruct(x, mask=mask)
    target = Path(args.out) if args.out else folder / "reconstructions.png"
    sparsify.save_reconstructions(out, target, columns=COLUMNS, max_images=len(images), mean=mean, std=std, labels=True)
    print(
        f"{PROG}: {checkpoint} ({cfg['model']}, {format_size((h, w))} px, mask ratio {spark.mask_ratio}, "
        f"seed {args.seed}) on {where} -> {target}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sparsify-reconstruct``: the exit code."""
    return run_main(PROG, lambda: _reconstruct(argv))


if __name__ == "__main__":
    sys.exit(main())
