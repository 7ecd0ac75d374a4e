"""Data for the recipes: image folders, the embedded sample photographs, augmentation, sampling.

Reproducibility is built in rather than bolted on: every sample's augmentation is drawn from its own
``torch.Generator`` seeded by (run seed, epoch, index), and :class:`GlobalBatchSampler` cuts each
global batch out of a seeded per-epoch permutation. So a batch's pixels depend only on the seed and
the step, not on the number of data-loader workers, not on the number of processes (each rank takes
its contiguous slice of the global batch), and not on whether the run was interrupted and resumed.

Unreadable or corrupt files are skipped: the sample is replaced by the next readable file (a
deterministic choice), and the bad path travels back with the batch so that the main process can
warn once per file and keep a count.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .cli import RecipeError

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SAMPLE_IMAGE_NAMES",
    "find_images",
    "find_labelled_images",
    "load_image",
    "sample_seed",
    "RandomResizedCropFlip",
    "ImageFiles",
    "SampleImages",
    "GlobalBatchSampler",
    "collate_images",
    "default_normalisation",
    "estimate_channel_stats",
    "SkipCounter",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Real photographs bundled inside the scikit-image wheel (no download needed). Grey ones are
# expanded to the model's channel count like any other image.
SAMPLE_IMAGE_NAMES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "camera",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
    "clock",
    "cell",
    "page",
    "text",
)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def _first_visit(dirpath: str, seen: set[tuple[int, int]]) -> bool:
    try:
        st = os.stat(dirpath)
    except OSError:
        return False
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True


def find_images(root: str | os.PathLike[str]) -> list[Path]:
    """All image files under ``root``, searched recursively, sorted.

    Symbolic links are followed, but each real directory is walked once: a link back to a parent (a
    loop) or a second link to the same folder adds nothing.

    Raises:
        RecipeError: when the folder is missing, not a folder, or holds no image files.
    """
    base = Path(root).expanduser()
    if not base.exists():
        raise RecipeError(f"data folder '{root}' does not exist; pass --data with a folder of images")
    if not base.is_dir():
        raise RecipeError(f"--data must be a folder of images, but '{root}' is a file")
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()  # (device, inode) of every real directory already walked
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        if not _first_visit(dirpath, seen):  # a symlink back to a folder already walked (a loop, or a twin)
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in filenames:
            if not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / name)
    if not found:
        raise RecipeError(
            f"no images found under '{root}' (searched recursively for "
            f"{', '.join(IMAGE_EXTENSIONS)}); point --data at a folder that contains image files"
        )
    return sorted(found)


def find_labelled_images(root: str | os.PathLike[str]) -> tuple[list[Path], list[int], list[str]]:
    """An ImageFolder layout: one sub-folder per class, images anywhere below it.

    Returns:
        (paths, labels, class names), classes sorted by folder name.

    Raises:
        RecipeError: when the folder is missing or has fewer than two classes with images.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise RecipeError(f"labelled data folder '{root}' does not exist or is not a folder")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not _is_hidden(p.name))
    paths: list[Path] = []
    labels: list[int] = []
    kept: list[str] = []
    for name in classes:
        try:
            files = find_images(base / name)
        except RecipeError:
            continue
        label = len(kept)
        kept.append(name)
        paths.extend(files)
        labels.extend([label] * len(files))
    if len(kept) < 2:
        raise RecipeError(
            f"'{root}' needs the ImageFolder layout: one sub-folder of images per class, at least two "
            f"classes (found {len(kept)})"
        )
    return paths, labels, kept


def _pil_to_channels(img: Image.Image, channels: int) -> Image.Image | np.ndarray:
    """Convert a PIL image to ``channels`` channels (1 grey, 3 RGB, 4 RGBA; others via numpy)."""
    if channels == 1:
        return img.convert("L")
    if channels == 3:
        return img.convert("RGB")
    if channels == 4:
        return img.convert("RGBA")
    arr = np.asarray(img.convert("L") if img.mode not in ("RGB", "RGBA") else img)
    return _array_to_channels(arr, channels)


def _array_to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) or (H, W, C) array -> (H, W, channels), repeating or cutting channels."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == channels:
        return arr
    if arr.shape[2] == 1:
        return np.repeat(arr, channels, axis=2)
    if arr.shape[2] > channels:
        return arr[:, :, :channels]
    reps = math.ceil(channels / arr.shape[2])
    return np.concatenate([arr] * reps, axis=2)[:, :, :channels]


def load_image(path: str | os.PathLike[str], channels: int = 3) -> torch.Tensor:
    """Read an image file as a float (C, H, W) tensor in [0, 1] with ``channels`` channels.

    ``.npy`` files holding (H, W[, C]) arrays are read too, for channel counts PIL cannot hold.

    Raises:
        OSError / ValueError: when the file cannot be decoded (callers skip such files).
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        arr = np.load(path, allow_pickle=False)
        arr = _array_to_channels(np.asarray(arr), channels)
        return _array_to_tensor(arr)
    with Image.open(path) as img:
        img.load()
        if img.mode in _WIDE_MODES:  # 16/32-bit grey: PIL's own conversion would clip it at 255
            return _array_to_tensor(_array_to_channels(_wide_to_unit(img), channels))
        converted = _pil_to_channels(img, channels)
    arr = np.asarray(converted)
    return _array_to_tensor(arr)


# PIL modes of more than 8 bits per pixel (16-bit PNG/TIFF open as I;16* or I, float TIFF as F).
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _wide_to_unit(img: Image.Image) -> np.ndarray:
    """A 16/32-bit or float grey image as float32 in [0, 1], scaled by the range its format can hold.

    16-bit files (PIL mode ``I;16*``, or ``I`` whose values fit in 16 bits) are divided by 65535; wider
    integers by their own maximum; float images are kept when already in [0, 1], else divided by their maximum.
    """
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        top = 65535.0
    elif img.mode == "I":
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        top = 65535.0 if lo >= 0 and hi <= 65535 else max(hi, 1.0)
        arr = np.clip(arr, 0.0, None)
    else:  # "F"
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        arr = np.clip(arr, 0.0, None)
        hi = float(arr.max(initial=0.0))
        top = 1.0 if hi <= 1.0 else hi
    return (arr / top).astype(np.float32)


def _array_to_tensor(arr: np.ndarray) -> torch.Tensor:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if not arr.flags.writeable:
        arr = arr.copy()
    if arr.dtype == np.uint8:
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)
    elif arr.dtype == np.uint16:
        t = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1).div_(65535.0)
    elif arr.dtype == bool:
        t = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1)
    else:
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)
    return t.contiguous()


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample's augmentation in one epoch."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class RandomResizedCropFlip:
    """RandomResizedCrop (bicubic, antialiased) + horizontal flip + normalisation, on a given generator.

    Works on float (C, H, W) tensors of any channel count and non-square output sizes: the aspect-ratio
    range is taken relative to the output's own aspect ratio, so crops are not distorted on average.

    Args:
        size: output (H, W).
        scale: range of the crop's area as a fraction of the image area (SparK: 0.67-1).
        ratio: range of the crop's aspect ratio (w/h) relative to the output's.
        flip: flip horizontally with probability 0.5.
        mean, std: per-channel normalisation.
    """

    def __init__(
        self,
        size: tuple[int, int],
        scale: tuple[float, float] = (0.67, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.scale = scale
        self.ratio = ratio
        self.flip = flip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def crop_params(self, height: int, width: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """(top, left, h, w) of a random crop, torchvision's algorithm driven by ``g``."""
        area = height * width
        aspect = self.size[1] / self.size[0]
        log_ratio = (math.log(self.ratio[0] * aspect), math.log(self.ratio[1] * aspect))
        for _ in range(10):
            u = torch.rand(3, generator=g).tolist()
            target_area = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0])
            r = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
            w = int(round(math.sqrt(target_area * r)))
            h = int(round(math.sqrt(target_area / r)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=g))
                left = int(torch.randint(0, width - w + 1, (1,), generator=g))
                return top, left, h, w
        # Fallback: the largest centred crop with the output's aspect ratio.
        if width / height > aspect:
            h, w = height, max(1, min(width, int(round(height * aspect))))
        else:
            w, h = width, max(1, min(height, int(round(width / aspect))))
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        top, left, h, w = self.crop_params(img.shape[-2], img.shape[-1], g)
        crop = img[:, top : top + h, left : left + w].unsqueeze(0)
        out = torch.nn.functional.interpolate(crop, size=self.size, mode="bicubic", antialias=True, align_corners=False)
        out = out.squeeze(0).clamp_(0.0, 1.0)
        if self.flip and bool(torch.rand(1, generator=g) < 0.5):
            out = out.flip(-1)
        return (out - self.mean) / self.std


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
        out = torch.nn.functional.interpolate(
            img.unsqueeze(0), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False
        )
        top, left = (nh - th) // 2, (nw - tw) // 2
        out = out[0, :, top : top + th, left : left + tw].clamp(0.0, 1.0)
        return (out - self.mean) / self.std


class _EpochDataset(Dataset):
    """Base: per-sample generators from (seed, epoch, index); ``set_epoch`` before each epoch."""

    def __init__(self, transform: RandomResizedCropFlip, seed: int) -> None:
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations ``__getitem__`` draws (set before creating an iterator)."""
        self.epoch = int(epoch)

    def generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))


class ImageFiles(_EpochDataset):
    """Image files (labels optional), augmented reproducibly; corrupt files are replaced, not fatal.

    ``__getitem__`` returns ``(image, label, bad_paths)``: ``bad_paths`` names the unreadable files that
    were skipped to produce this sample (usually empty). ``label`` is -1 when there are no labels.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        transform: RandomResizedCropFlip | Any,
        channels: int = 3,
        labels: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(transform, seed)
        self.paths = [str(p) for p in paths]
        self.labels = list(labels) if labels is not None else None
        self.channels = int(channels)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> tuple[torch.Tensor, int, tuple[str, ...]]:
        """The first readable image at or after ``index`` (wrapping), its position and the skipped paths."""
        bad: list[str] = []
        n = len(self.paths)
        for k in range(n):
            j = (index + k) % n
            try:
                return load_image(self.paths[j], self.channels), j, tuple(bad)
            except Exception:  # noqa: BLE001 - any decoding failure means "skip this file"
                bad.append(self.paths[j])
        raise RecipeError(f"none of the {n} image files could be read (first: {self.paths[0]})")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, tuple[str, ...]]:
        img, j, bad = self.read(index)
        if isinstance(self.transform, RandomResizedCropFlip):
            out = self.transform(img, self.generator(index))
        else:
            out = self.transform(img)
        label = self.labels[j] if self.labels is not None else -1
        return out, label, bad

    def probe(self, limit: int = 64) -> None:
        """Fail early with a clear message when the first ``limit`` files are all unreadable."""
        for path in self.paths[:limit]:
            try:
                load_image(path, self.channels)
                return
            except Exception:  # noqa: BLE001
                continue
        raise RecipeError(
            f"could not read any of the first {min(limit, len(self.paths))} image files "
            f"(e.g. '{self.paths[0]}'); are they valid images?"
        )


def _load_sample_images(channels: int) -> list[torch.Tensor]:
    import skimage.data as skdata

    images: list[torch.Tensor] = []
    for name in SAMPLE_IMAGE_NAMES:
        try:
            arr = np.asarray(getattr(skdata, name)())
        except Exception:  # noqa: BLE001 - a sample missing from this scikit-image version
            continue
        images.append(_array_to_tensor(_array_to_channels(arr, channels)))
    if not images:
        raise RecipeError("scikit-image's bundled sample photographs could not be read; pass --data DIR")
    return images


class SampleImages(_EpochDataset):
    """The embedded default: scikit-image's bundled photographs, read offline, with random crops.

    Each epoch has ``length`` samples cycling through the photographs; every sample is a fresh random
    crop, so a handful of photographs gives a varied stream for a demonstration run.
    """

    def __init__(self, transform: RandomResizedCropFlip, channels: int = 3, length: int = 256, seed: int = 0) -> None:
        super().__init__(transform, seed)
        self.images = _load_sample_images(channels)
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, tuple[str, ...]]:
        img = self.images[index % len(self.images)]
        return self.transform(img, self.generator(index)), -1, ()


def collate_images(
    batch: list[tuple[torch.Tensor, int, tuple[str, ...]]],
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack images and labels; flatten the skipped-file lists."""
    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
    bad = [p for b in batch for p in b[2]]
    return images, labels, bad


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's part of every micro-batch of a seeded per-epoch permutation.

    The permutation for an epoch depends only on (seed, epoch). Optimiser step ``s`` uses global
    indices ``perm[s*B : (s+1)*B]``, split into ``accum`` consecutive micro-batches, each split into
    ``world_size`` consecutive per-rank slices. Hence one process with batch 2b sees exactly the samples
    that two processes with batch b see together, in the same order.

    Args:
        num_samples: dataset length.
        global_batch: images per optimiser step over all ranks (B).
        world_size, rank: the process layout.
        accum: gradient-accumulation micro-steps per optimiser step.
        seed: permutation seed.
        shuffle: permute (True) or keep dataset order.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        world_size: int = 1,
        rank: int = 0,
        accum: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if global_batch % (world_size * accum) != 0:
            raise RecipeError(
                f"--batch-size {global_batch} must be divisible by processes x --accum = {world_size} x {accum}"
            )
        if num_samples < global_batch:
            raise RecipeError(
                f"--batch-size {global_batch} is larger than the dataset ({num_samples} images); "
                "lower --batch-size or add images"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.world_size = world_size
        self.rank = rank
        self.accum = accum
        self.seed = seed
        self.shuffle = shuffle
        self.local_batch = global_batch // (world_size * accum)
        self.steps_per_epoch = num_samples // global_batch
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch, and the optimiser step within it to start from (for resuming)."""
        self.epoch = int(epoch)
        self.start_step = int(start_step)

    def permutation(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        perm = self.permutation()
        micro = self.global_batch // self.accum
        for step in range(self.start_step, self.steps_per_epoch):
            for m in range(self.accum):
                lo = step * self.global_batch + m * micro + self.rank * self.local_batch
                yield perm[lo : lo + self.local_batch].tolist()

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum


def default_normalisation(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """ImageNet statistics for 3 channels; ``None`` means "estimate from the data"."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return None


def estimate_channel_stats(
    images: Sequence[torch.Tensor] | None = None,
    paths: Sequence[str] | None = None,
    channels: int = 3,
    limit: int = 64,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units over up to ``limit`` images (for non-RGB data)."""
    tensors: list[torch.Tensor] = list(images[:limit]) if images is not None else []
    if paths is not None:
        step = max(1, len(paths) // limit)
        for p in list(paths)[::step][:limit]:
            try:
                tensors.append(load_image(p, channels))
            except Exception:  # noqa: BLE001
                continue
    if not tensors:
        return (0.5,) * channels, (0.25,) * channels
    sums = torch.zeros(channels, dtype=torch.float64)
    sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for t in tensors:
        flat = t.reshape(t.shape[0], -1).double()
        sums += flat.sum(1)
        sq += (flat * flat).sum(1)
        count += flat.shape[1]
    mean = sums / count
    std = (sq / count - mean * mean).clamp_min(1e-6).sqrt().clamp_min(1e-3)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


class SkipCounter:
    """Main-process record of skipped (unreadable) files: warns once per file, keeps the count."""

    def __init__(self, known: Sequence[str] = (), noun: str = "image") -> None:
        self.paths: set[str] = set(known)
        self.noun = noun  # "image", or "volume" (whose entries are "path (why)")

    def update(self, bad: Sequence[str], report: bool = True) -> None:
        from .cli import warn

        for p in bad:
            if p not in self.paths:
                self.paths.add(p)
                if report:
                    what = f"unreadable image '{p}'" if self.noun == "image" else f"damaged {self.noun} {p}"
                    warn(f"skipped {what} ({len(self.paths)} skipped so far)")

    @property
    def count(self) -> int:
        return len(self.paths)
