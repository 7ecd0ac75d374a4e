"""Volume data for the recipes: folders of CT/MRI scans, and an offline synthetic default.

Files and layout
    * NIfTI (``.nii``, ``.nii.gz``, read with nibabel): the array's axes (x, y, z[, t]) become
      ([t,] z, y, x), i.e. (D, H, W) = (z, y, x). No reorientation to a standard frame is done: voxels
      are used in the order the file stores them. The spacing (d, h, w) in mm is the header's zooms
      reordered the same way. The header's intensity scaling (scl_slope/scl_inter) is applied.
      Uncompressed ``.nii`` files without scaling are memory-mapped (only the crop is read).
    * ``.npy``: (D, H, W) or (C, D, H, W); no spacing. Read memory-mapped: only the crop is read.
    * ``.npz``: the array under the key ``image``, ``data`` or ``volume``, else the first array; an
      optional ``spacing`` array gives (d, h, w).
    * DICOM series: a folder directly holding files that end in ``.dcm`` or carry the ``DICM`` marker
      at byte 128 is one single-channel volume; slices are sorted along the slice normal by
      ImagePositionPatient (InstanceNumber when positions are missing), RescaleSlope/Intercept are
      applied (CT in HU), and the spacing comes from the slice positions and PixelSpacing. Needs pydicom
      (``pip install 'sparsify-cnn[scans]'``); without it the folder is refused with that advice.
    * Trailing length-1 axes beyond the third are dropped; a file with fewer than 3 or more than 4
      remaining axes is refused (named, and skipped like a damaged file).

4-D files and channels (``channels`` is the model's input channel count when known)
    * A 4-D file's leading axis L (NIfTI's 4th axis, ``.npy``'s first) holds channels when
      ``channels == L``. Otherwise, when ``channels`` is 1 or not given, each of the L time points
      (or echoes) is a separate single-channel sample. Any other combination is refused with a message
      saying what to do (pass a model with L input channels, or split the file).
    * Multi-modal stacks by folder: when ``channels`` is 2 or more and every folder that holds volume
      files (never the data folder itself) holds the same set of ``channels`` file names, after removing
      the folder's own name from each file name (so ``BraTS_001/BraTS_001_t1.nii.gz`` and
      ``BraTS_002/BraTS_002_t1.nii.gz`` match), each folder is one case and its files, in sorted name
      order, are its channels. The files of one case must share one 3-D shape. Without ``channels``
      (or with 1) every file is its own case: only the model's channel count can tell case folders
      from class folders whose files happen to be named alike.
    * 3-D files with ``channels`` > 1 and no such folders are refused (nothing is repeated silently).
    * Labels: when every case lies below a first-level sub-folder of the data folder (below it, for a
      case folder), there are at least two such folders and one of them holds two cases or more, the
      first-level folder names are the labels (class folders, for the k-NN monitor); otherwise none.

Intensity (:func:`parse_intensity`), per volume and per channel
    * ``percentile`` (default): clip to the 0.5/99.5 percentiles of the foreground (voxels above the
      volume's minimum; all voxels when it is constant), then subtract the mean and divide by the
      standard deviation of the clipped foreground. ``percentile:LO,HI`` uses other percentiles.
      Statistics come from a regular strided subsample of at most about 2 million voxels per channel.
    * ``ct:L,H``: clip to L..H Hounsfield units and scale to 0..1; ``ct:lung`` (-1350..150),
      ``ct:soft`` (-160..240), ``ct:bone`` (-500..1300), ``ct:brain`` (0..80).
    * ``none``: raw values as float32.

Crops (:class:`VolumeDataset`)
    * Training: a random crop, then a flip along each spatial axis with probability 1/2, all drawn from a
      generator seeded by (seed, epoch, index) as in 2-D, so a sample depends on neither the number of
      workers nor interruptions. Evaluation (``train=False``): the centred crop, no flips.
    * An axis shorter than the crop is taken whole and padded with the background value (what the
      channel's minimum maps to under the intensity rule), placed at a random (centred) offset; the
      case is counted in ``padded_count``. ``pad="refuse"`` raises a clear error naming the file instead.
    * A damaged file is recorded in ``damaged`` (path -> reason) and the next readable case is returned
      (a deterministic choice); when no case can be read a clear error is raised.
    * ``cache_dir``: decompressed voxels are stored as ``.npy`` (atomic writes), keyed by the source's
      path, size and modification time, and memory-mapped by later epochs and runs; ``.npy`` sources are
      memory-mapped directly. Only the crop is then materialised. The per-volume intensity statistics
      are cached there too (``<key>.stats.json``), so a new run or a fresh worker does not read whole
      volumes again to recompute them. The folder is marked (``.sparsify-volume-cache``) and skipped by
      :func:`find_volumes`, so it may live inside the data folder.
    * With a multi-worker DataLoader each worker holds its own copy of the dataset: ``damaged``,
      ``padded_count`` and ``spacings_seen`` then count in that worker only, not in the main process.
      Use :meth:`VolumeDataset.sample` (its third item names the files skipped for that sample, as the
      2-D data sets do) to report skips from the main process, and :meth:`VolumeDataset.survey` to learn
      spacings and small volumes from the headers in the main process before training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ._synthetic_volumes import phantom
from ._volume_io import (
    CACHE_MARKER,
    VOLUME_SUFFIXES,
    DamagedVolume,
    cached_raw,
    cached_stats,
    is_dicom_file,
    load_raw,
    probe_shape,
    probe_spacing,
    volume_suffix,
)
from ._volume_transforms import CT_WINDOWS, IntensityRule, parse_intensity, plan_axis
from .cli import RecipeError
from .data import IMAGE_EXTENSIONS, _first_visit, _is_hidden, sample_seed

__all__ = [
    "VOLUME_SUFFIXES",
    "CT_WINDOWS",
    "DamagedVolume",
    "IntensityRule",
    "VolumeCase",
    "VolumeDataset",
    "SyntheticVolumes",
    "find_volumes",
    "looks_like_volumes",
    "parse_intensity",
    "read_volume",
]


@dataclass(frozen=True)
class VolumeCase:
    """One sample's source: one path per channel (a file, or a DICOM series folder).

    Attributes:
        paths: the channel sources, in channel order.
        label: the class folder name, or None.
        frame: for a 4-D file used one time point at a time, the time point; None otherwise.
    """

    paths: tuple[Path, ...]
    label: str | None = None
    frame: int | None = None

    @property
    def name(self) -> str:
        """How logs name the case: its first path, plus the time point of a 4-D file."""
        text = str(self.paths[0]) if len(self.paths) == 1 else str(self.paths[0].parent)
        return text if self.frame is None else f"{text}[t={self.frame}]"


# ------------------------------------------------------------------------------------------- discovery


def _walk(base: Path) -> list[tuple[Path, list[str], bool]]:
    """(folder, volume file names, is a DICOM series) for every folder under ``base`` holding volumes."""
    found: list[tuple[Path, list[str], bool]] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        if not _first_visit(dirpath, seen):
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        folder = Path(dirpath)
        if CACHE_MARKER in filenames:  # a voxel cache kept inside the data folder
            dirnames[:] = []
            continue
        names = sorted(n for n in filenames if not _is_hidden(n))
        volumes = [n for n in names if volume_suffix(n)]
        others = [n for n in names if not volume_suffix(n) and not n.lower().endswith(IMAGE_EXTENSIONS)]
        dicom = any(is_dicom_file(folder / n) for n in others)
        if dicom:
            dirnames[:] = []  # a series folder is one volume; its sub-folders are not walked
        if volumes or dicom:
            found.append((folder, volumes, dicom))
    return found


def looks_like_volumes(root: str | os.PathLike[str]) -> bool:
    """True when ``root`` holds volume files or DICOM series, and at least as many volumes as images."""
    base = Path(root).expanduser()
    if not base.is_dir():
        return False
    volumes = images = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        if not _first_visit(dirpath, seen):
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        if CACHE_MARKER in filenames:
            dirnames[:] = []
            continue
        names = [n for n in filenames if not _is_hidden(n)]
        volumes += sum(1 for n in names if volume_suffix(n))
        images += sum(1 for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
        if any(is_dicom_file(Path(dirpath) / n) for n in names if n.lower().endswith(".dcm")) or any(
            not volume_suffix(n) and not n.lower().endswith(IMAGE_EXTENSIONS) and is_dicom_file(Path(dirpath) / n)
            for n in names[:8]
        ):
            volumes += 1
            dirnames[:] = []
    return volumes > 0 and volumes >= images


def _modality_key(folder: Path, name: str) -> str:
    return name.replace(folder.name, "", 1) if folder.name else name


def _multimodal(base: Path, groups: list[tuple[Path, list[str], bool]], channels: int | None) -> bool:
    # Only the model's channel count decides: class folders of files named alike would otherwise look
    # like case folders.
    if channels is None or channels < 2:
        return False
    if any(dicom for _, _, dicom in groups) or any(f == base for f, _, _ in groups):
        return False
    keys = {tuple(sorted(_modality_key(f, n) for n in names)) for f, names, _ in groups}
    if len(keys) != 1:
        return False
    count = len(next(iter(keys)))
    if count < 2 or any(len(set(k)) != len(k) for k in keys):
        return False
    return channels == count


def _refuse_channels(path: Path, what: str, channels: int, hint: str = "") -> RecipeError:
    return RecipeError(
        f"'{path}' {what}, but the model takes {channels} input channels; give each case a folder of "
        f"{channels} files (one per channel, the same names in every case folder), or {channels}-channel "
        f"4-D files, or use a model with 1 input channel{hint}"
    )


def _odd_case_folder(base: Path, groups: list[tuple[Path, list[str], bool]], channels: int) -> str:
    """When most folders look like case folders of ``channels`` files, name one that does not (or "")."""
    sets = [(f, tuple(sorted(_modality_key(f, n) for n in names))) for f, names, d in groups if not d and f != base]
    common: dict[tuple[str, ...], int] = {}
    for _, k in sets:
        if len(k) == channels:
            common[k] = common.get(k, 0) + 1
    if not common:
        return ""
    usual = max(common, key=lambda k: common[k])
    odd = next(((f, k) for f, k in sets if k != usual), None)
    if odd is None:
        return ""
    return f" (case folder '{odd[0]}' holds {list(odd[1])} where the others hold {list(usual)})"


def _single_cases(path: Path, channels: int | None, hint: str = "") -> tuple[list[VolumeCase], DamagedVolume | None]:
    """The cases one file gives (without labels), and why its header could not be read (None: it could)."""
    try:
        shape = probe_shape(path)
    except DamagedVolume as exc:
        return [VolumeCase((path,))], exc
    if len(shape) == 3:
        if channels not in (None, 1):
            raise _refuse_channels(path, f"is a single-channel 3-D volume {shape}", int(channels), hint)
        return [VolumeCase((path,))], None
    lead = shape[0]
    if channels == lead:
        return [VolumeCase((path,))], None
    if channels in (None, 1):
        return [VolumeCase((path,), frame=t) for t in range(lead)], None
    raise RecipeError(
        f"'{path}' is 4-D with {lead} volumes along its 4th axis {shape}, but the model takes {channels} input "
        f"channels; use a model with {lead} input channels (they become channels) or with 1 (each becomes a "
        "sample), or split the file"
    )


def find_volumes(root: str | os.PathLike[str], *, channels: int | None = None) -> list[VolumeCase]:
    """All volume cases under ``root`` (searched recursively), sorted; the rules are in the module docstring.

    Args:
        root: the data folder.
        channels: the model's input channels, when known (decides 4-D files and multi-modal folders).

    Raises:
        RecipeError: missing folder, no volumes (listing the accepted suffixes), a channel layout that
            does not fit ``channels``, or DICOM without pydicom.
    """
    base = Path(root).expanduser()
    if not base.exists():
        raise RecipeError(f"data folder '{root}' does not exist; pass --data with a folder of volumes")
    if not base.is_dir():
        raise RecipeError(f"--data must be a folder of volumes, but '{root}' is a file")
    groups = _walk(base)
    if not groups:
        raise RecipeError(
            f"no volumes found under '{root}' (searched recursively for {', '.join(VOLUME_SUFFIXES)} files and "
            "DICOM series folders); point --data at a folder that contains scans"
        )
    if any(dicom for _, _, dicom in groups):
        try:
            import pydicom  # noqa: F401
        except ImportError:
            first = next(f for f, _, d in groups if d)
            raise RecipeError(
                f"'{first}' is a DICOM series, and reading DICOM needs pydicom: pip install 'sparsify-cnn[scans]'"
            ) from None
        if channels not in (None, 1):
            first = next(f for f, _, d in groups if d)
            raise _refuse_channels(first, "is a single-channel DICOM series", int(channels))
    cases: list[tuple[VolumeCase, int]] = []  # (case, depth of the label folder: 1 file, 2 case folder)
    readable = 0
    first_damage: list[DamagedVolume] = []
    if _multimodal(base, groups, channels):
        for folder, names, _ in groups:
            paths = tuple(folder / n for n in sorted(names, key=lambda n: _modality_key(folder, n)))
            for p in paths:
                try:
                    shape = probe_shape(p)
                except DamagedVolume as exc:
                    first_damage.append(exc)
                    continue
                readable += 1
                if len(shape) == 4:
                    raise RecipeError(
                        f"'{p}' is 4-D {shape} inside a multi-modal case folder; case folders must hold one 3-D "
                        "file per channel (split the file, or put 4-D files side by side without case folders)"
                    )
            cases.append((VolumeCase(paths), 2))
    else:
        hint = _odd_case_folder(base, groups, channels) if channels is not None and channels > 1 else ""
        for folder, names, dicom in groups:
            if dicom:
                cases.append((VolumeCase((folder,)), 2))
                readable += 1
            for n in names:
                got, damage = _single_cases(folder / n, channels, hint)
                readable += damage is None
                first_damage.extend([damage] if damage is not None else [])
                cases.extend((c, 1) for c in got)
    if readable == 0:
        why = f"{first_damage[0].path}': {first_damage[0].why}" if first_damage else f"{cases[0][0].paths[0]}'"
        raise RecipeError(
            f"none of the volume files under '{root}' could be read (e.g. '{why}); "
            f"are they valid {', '.join(VOLUME_SUFFIXES)} files?"
        )
    labels = _labels(base, cases)
    out = [VolumeCase(c.paths, label, c.frame) for (c, _), label in zip(cases, labels)]
    return sorted(out, key=lambda c: (tuple(str(p) for p in c.paths), -1 if c.frame is None else c.frame))


def _labels(base: Path, cases: list[tuple[VolumeCase, int]]) -> list[str | None]:
    names: list[str | None] = []
    for case, depth in cases:
        anchor = case.paths[0] if depth == 1 else case.paths[0].parent
        if depth == 2 and len(case.paths) == 1:  # a DICOM folder
            anchor = case.paths[0]
        rel = anchor.relative_to(base).parts
        names.append(rel[0] if len(rel) >= 2 else None)
    if any(n is None for n in names):
        return [None] * len(names)
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1  # type: ignore[index]
    if len(counts) < 2 or max(counts.values()) < 2:
        return [None] * len(names)
    return names


# ------------------------------------------------------------------------------------------- reading


def _channels_of(case: VolumeCase, cache_dir: Path | None) -> tuple[list[np.ndarray], tuple[float, ...] | None]:
    """The case's channels as 3-D (D, H, W) arrays (memory-mapped where possible) and its spacing."""
    chans: list[np.ndarray] = []
    spacing: tuple[float, ...] | None = None
    for k, path in enumerate(case.paths):
        arr, sp = cached_raw(path, cache_dir) if cache_dir is not None else load_raw(path, mmap=True)
        if k == 0:
            spacing = sp
        if arr.ndim == 3:
            if case.frame is not None:
                raise DamagedVolume(path, f"is 3-D {arr.shape} but was listed as time point {case.frame} of a 4-D file")
            chans.append(arr)
        elif case.frame is not None:
            if case.frame >= arr.shape[0]:
                raise DamagedVolume(path, f"has {arr.shape[0]} time points, time point {case.frame} is missing")
            chans.append(arr[case.frame])
        elif len(case.paths) == 1 or arr.shape[0] == 1:
            chans.extend(arr[c] for c in range(arr.shape[0]))
        else:
            raise DamagedVolume(
                path, f"is 4-D {arr.shape} inside a multi-modal case; expected one 3-D file per channel"
            )
    shapes = {tuple(c.shape) for c in chans}
    if len(shapes) != 1:
        raise DamagedVolume(case.paths[0], f"the case's channels differ in shape: {sorted(shapes)}")
    return chans, spacing


def read_volume(case: VolumeCase, *, cache_dir: Path | None = None) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """The whole case as float32 (C, D, H, W) raw values (no normalisation) and its (d, h, w) spacing in mm.

    Raises:
        DamagedVolume: when a file cannot be read or the channels do not match.
    """
    chans, spacing = _channels_of(case, cache_dir)
    return np.stack([np.asarray(c, dtype=np.float32) for c in chans]), spacing


# ------------------------------------------------------------------------------------------- datasets


def _as_crop(crop: int | Sequence[int]) -> tuple[int, int, int]:
    values = (int(crop),) * 3 if isinstance(crop, (int, np.integer)) else tuple(int(c) for c in crop)
    if len(values) != 3 or any(v <= 0 for v in values):
        raise RecipeError(f"a volume crop needs three positive sizes (D, H, W), got {crop}")
    return values  # type: ignore[return-value]


class VolumeDataset(Dataset):
    """Random (or centred) 3-D crops of volume cases, normalised per volume; see the module docstring.

    ``__getitem__`` returns a float32 tensor (C, D, H, W); :meth:`sample` returns ``(tensor, label index,
    skipped paths)`` for :func:`~.data.collate_images` (label index -1 without labels).

    Args:
        cases: from :func:`find_volumes`.
        crop: (D, H, W) of every sample.
        intensity: an intensity rule (text for :func:`parse_intensity`, or a parsed rule).
        cache_dir: where decompressed voxels are cached (None: decode on every read).
        pad: ``"background"`` pads volumes smaller than the crop; ``"refuse"`` raises instead.
        train: random crops and flips (True) or centred crops (False).
        seed: the run seed of the per-sample generators.
    """

    def __init__(
        self,
        cases: Sequence[VolumeCase],
        crop: int | Sequence[int],
        *,
        intensity: str | IntensityRule = "percentile",
        cache_dir: Path | None = None,
        pad: str = "background",
        train: bool = True,
        seed: int = 0,
    ) -> None:
        if not cases:
            raise RecipeError("no volume cases to read; point --data at a folder that contains scans")
        if pad not in ("background", "refuse"):
            raise RecipeError(f"pad must be 'background' or 'refuse', got '{pad}'")
        self.cases = list(cases)
        self.crop = _as_crop(crop)
        self.rule = parse_intensity(intensity)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.pad = pad
        self.train = bool(train)
        self.seed = int(seed)
        self.epoch = 0
        self.classes = sorted({c.label for c in self.cases if c.label is not None})
        self.damaged: dict[str, str] = {}
        self.padded: set[str] = set()
        self.spacings_seen: set[tuple[float, ...] | None] = set()
        self._stats: dict[int, list[tuple[float, ...]]] = {}

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def padded_count(self) -> int:
        """How many distinct cases (in this process) were smaller than the crop and padded."""
        return len(self.padded)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops and flips ``__getitem__`` draws (set before creating an iterator)."""
        self.epoch = int(epoch)

    def generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))

    def label_index(self, j: int) -> int:
        label = self.cases[j].label
        return self.classes.index(label) if label is not None else -1

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.sample(index)[0]

    def sample(self, index: int) -> tuple[torch.Tensor, int, tuple[str, ...]]:
        """The crop for ``index`` (the next readable case when it is damaged), its label index, skipped paths."""
        n = len(self.cases)
        bad: list[str] = []
        for k in range(n):
            j = (index + k) % n
            known = next((str(p) for p in self.cases[j].paths if str(p) in self.damaged), None)
            if known is not None:
                bad.append(known)
                continue
            try:
                return self._crop(j, self.generator(index)), self.label_index(j), tuple(bad)
            except DamagedVolume as exc:
                self.damaged[exc.path] = exc.why
                bad.append(exc.path)
        first = next(iter(self.damaged.items()), ("?", "?"))
        raise RecipeError(
            f"none of the {n} volumes could be read (e.g. '{first[0]}': {first[1]}); check the files under --data"
        )

    def _channel_stats(self, j: int, chans: list[np.ndarray]) -> list[tuple[float, ...]]:
        if j not in self._stats:
            case = self.cases[j]
            tag = f"{self.rule.kind}:{self.rule.low!r},{self.rule.high!r}/frame={case.frame}/v1"
            self._stats[j] = cached_stats(case.paths, tag, self.cache_dir, lambda: [self.rule.stats(c) for c in chans])
        return self._stats[j]

    def _crop(self, j: int, g: torch.Generator) -> torch.Tensor:
        case = self.cases[j]
        chans, spacing = _channels_of(case, self.cache_dir)
        self.spacings_seen.add(None if spacing is None else tuple(round(float(s), 4) for s in spacing))
        shape = tuple(int(s) for s in chans[0].shape)
        plans = [plan_axis(size, c, g if self.train else None) for size, c in zip(shape, self.crop)]
        if any(length < c for (_, length, _), c in zip(plans, self.crop)):
            if self.pad == "refuse":
                raise RecipeError(
                    f"'{case.name}' is {'x'.join(map(str, shape))} voxels, smaller than the crop "
                    f"{'x'.join(map(str, self.crop))}; use a smaller crop, or let small volumes be padded"
                )
            self.padded.add(case.name)
        stats = self._channel_stats(j, chans)
        out = np.empty((len(chans), *self.crop), dtype=np.float32)
        src = tuple(slice(s, s + length) for s, length, _ in plans)
        dst = tuple(slice(o, o + length) for _, length, o in plans)
        try:
            for c, arr in enumerate(chans):
                out[c] = self.rule.background(stats[c])
                out[(c, *dst)] = self.rule.apply(arr[src], stats[c])
        except (OSError, ValueError) as exc:  # a truncated memory-mapped file fails only when read
            raise DamagedVolume(case.paths[0], f"{type(exc).__name__}: {exc}") from exc
        if self.train:
            flips = [axis + 1 for axis in range(3) if bool(torch.rand(1, generator=g) < 0.5)]
            if flips:
                out = np.flip(out, axis=flips).copy()  # a copy: torch refuses negative strides
        return torch.from_numpy(out)

    def survey(self) -> dict[str, object]:
        """Headers only, in this process: spacings seen and cases smaller than the crop (for the run header).

        Fills ``spacings_seen``; returns ``{"spacings": set, "small": [case names], "unreadable": [paths]}``.
        """
        small: list[str] = []
        unreadable: list[str] = []
        for case in self.cases:
            try:
                shape = probe_shape(case.paths[0]) if not case.paths[0].is_dir() else None
                spacing = probe_spacing(case.paths[0])
            except DamagedVolume as exc:
                unreadable.append(exc.path)
                continue
            self.spacings_seen.add(None if spacing is None else tuple(round(float(s), 4) for s in spacing))
            if shape is not None and any(s < c for s, c in zip(shape[-3:], self.crop)):
                small.append(case.name)
        return {"spacings": set(self.spacings_seen), "small": small, "unreadable": unreadable}


class SyntheticVolumes(Dataset):
    """The offline default: ``n`` synthetic 3-D phantoms (ellipsoids in noise), deterministic per index.

    Each item is a float32 tensor (channels, D, H, W) normalised with the ``percentile`` rule; class
    ``index % 2`` (few large blobs against many small ones) is in ``labels`` for the k-NN monitor.
    """

    def __init__(self, n: int, size: int | Sequence[int], channels: int = 1, seed: int = 0) -> None:
        if n <= 0 or channels <= 0:
            raise RecipeError(f"synthetic volumes need n >= 1 and channels >= 1 (got n={n}, channels={channels})")
        self.n = int(n)
        self.size = _as_crop(size)
        self.channels = int(channels)
        self.seed = int(seed)
        self.rule = parse_intensity("percentile")
        self.labels = [i % 2 for i in range(self.n)]
        self.classes = ["few-large", "many-small"]

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        """Accepted for symmetry with the file data sets; phantoms do not change between epochs."""

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.sample(index)[0]

    def sample(self, index: int) -> tuple[torch.Tensor, int, tuple[str, ...]]:
        """(volume, class, no skipped paths), like :meth:`VolumeDataset.sample`."""
        if not 0 <= index < self.n:
            raise IndexError(f"synthetic volume {index} out of range 0..{self.n - 1}")
        vol, label = phantom(index, self.size, self.channels, self.seed)
        out = np.stack([self.rule.apply(c, self.rule.stats(c)) for c in vol])
        return torch.from_numpy(out), label, ()
