"""The volume side of ``sparsify-pretrain``: a folder of scans (or the synthetic default) as a training stream.

:mod:`.volumes` reads scans (NIfTI, NumPy, DICOM series), normalises intensities and cuts 3-D crops; this
module fits that into the run the 2-D path already has (:mod:`.train_loop`): samples as
``(volume, label, skipped)`` like :class:`~.data.ImageFiles`'s, one augmentation stream per (seed, epoch,
index) so a resumed run sees the batches an uninterrupted one would, the facts the run header states
(spacing seen, cases padded, damaged files), and the k-NN monitor's reader for class folders of volumes.

A damaged file is named as it is found (the probe at the start, or the first batch that meets it) and in
the end summary; the sample is replaced by another case and the run goes on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed as dist_utils
from .cli import RecipeError, warn
from .data import sample_seed

__all__ = ["VolumeSamples", "VolumeRunData", "volume_run_data", "read_knn_volumes", "PROBE_CASES", "MAX_KNN_VOLUMES"]

#: cases read in full before training to report spacing, padding and damaged files (a sample, not a pass)
PROBE_CASES = 16
#: volumes the k-NN monitor reads at most (held in memory as crops)
MAX_KNN_VOLUMES = 512


def _sample_of(item: Any) -> torch.Tensor:
    """The volume tensor of a dataset item (a tensor, or a tuple whose first entry is one)."""
    x = item[0] if isinstance(item, (tuple, list)) else item
    return torch.as_tensor(x, dtype=torch.float32)


class VolumeSamples(torch.utils.data.Dataset):
    """A volume dataset as the training loop reads samples: ``(volume (C, D, H, W), -1, skipped)``.

    Each item is drawn with NumPy's and torch's global generators seeded from (seed, epoch, index) and
    restored afterwards, so a crop depends only on those three (not on workers, ranks or a resume).
    ``skipped`` lists ``"path (why)"`` for the damaged files met while producing this sample: it travels
    back with the batch (the dataset's own record lives in whichever worker process read the file).
    """

    def __init__(self, base: Any, seed: int = 0) -> None:
        self.base = base
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops ``__getitem__`` draws (set before creating an iterator)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, tuple[str, ...]]:
        damaged = getattr(self.base, "damaged", None)
        before = set(damaged) if damaged is not None else set()
        s = sample_seed(self.seed, self.epoch, index)
        np_state, torch_state = np.random.get_state(), torch.random.get_rng_state()
        np.random.seed(s % 2**32)
        torch.manual_seed(s)
        if hasattr(self.base, "set_sample_seed"):
            self.base.set_sample_seed(s)
        try:
            x = _sample_of(self.base[index])
        finally:
            np.random.set_state(np_state)
            torch.random.set_rng_state(torch_state)
        new = [p for p in (damaged or {}) if p not in before]
        return x, -1, tuple(f"{p} ({damaged[p]})" for p in new)


class VolumeRunData:
    """What a volume run needs from its data: the dataset, a description and the header's facts."""

    def __init__(self, dataset: VolumeSamples, description: str, facts: list[str], damaged: list[str]) -> None:
        self.dataset = dataset
        self.description = description
        self.facts = facts  # header lines
        self.damaged = damaged  # "path (why)" found by the probe


def _spacing_text(spacings: Sequence[tuple[float, ...] | None]) -> str:
    """``"1x1x1.2 mm (3 cases), unknown (1)"``: the distinct spacings seen, most common first."""
    counts: dict[str, int] = {}
    for sp in spacings:
        key = "unknown" if sp is None else "x".join(f"{v:.3g}" for v in sp) + " mm"
        counts[key] = counts.get(key, 0) + 1
    parts = sorted(counts.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{k} ({n})" for k, n in parts[:4])
    return shown + (f", {len(parts) - 4} more" if len(parts) > 4 else "")


def volume_run_data(cfg: Any, channels: int, out: Path, is_main: bool = True) -> VolumeRunData:
    """The training samples of a volume run: ``--data`` (a folder of scans) or the synthetic default."""
    from . import volumes

    crop = tuple(int(v) for v in cfg.input_size)
    if cfg.data is None:
        base = volumes.SyntheticVolumes(int(cfg.sample_length), crop, channels=channels, seed=int(cfg.seed))
        desc = f"{len(base)} synthetic volumes (offline phantoms, {channels} channel(s))"
        facts = ["  volumes: synthetic phantoms made on the fly (no data, no download), intensity: as generated"]
        return VolumeRunData(VolumeSamples(base, cfg.seed), desc, facts, [])
    root = Path(cfg.data).expanduser()
    cases = volumes.find_volumes(root, channels=channels)
    intensity = cfg.intensity or "percentile"
    volumes.parse_intensity(intensity)  # a bad rule stops here, naming the forms
    cache = None
    if (cfg.volume_cache or "").lower() != "none":
        cache = Path(cfg.volume_cache).expanduser() if cfg.volume_cache else out / "volume_cache"
    base = volumes.VolumeDataset(
        cases, crop, intensity=intensity, cache_dir=cache, pad="refuse" if cfg.small_volumes == "refuse" else
        "background", train=True, seed=int(cfg.seed),
    )  # fmt: skip
    # The probe: a few cases read in full on the main process, for the header (spacing, padding, damage).
    spacings: list[tuple[float, ...] | None] = []
    padded, damaged = 0, []
    for case in cases[:PROBE_CASES] if is_main else []:
        try:
            arr, spacing = volumes.read_volume(case)
        except volumes.DamagedVolume as err:
            why = getattr(err, "why", None) or str(err)
            path = str(getattr(err, "path", case.paths[0]))
            damaged.append(f"{path} ({why})")
            warn(f"damaged volume '{path}': {why}; it is skipped and the run goes on")
            continue
        spacings.append(None if spacing is None else tuple(float(v) for v in spacing))
        small = [s < c for s, c in zip(arr.shape[-3:], crop)]
        if any(small):
            if cfg.small_volumes == "refuse":
                raise RecipeError(
                    f"volume '{case.paths[0]}' has size {'x'.join(map(str, arr.shape[-3:]))}, smaller than the crop "
                    f"{'x'.join(map(str, crop))}; use a smaller --input-size, or --small-volumes pad to pad it "
                    "with the background value"
                )
            padded += 1
    labelled = sorted({c.label for c in cases if c.label is not None})
    desc = f"{len(cases)} volume case(s) under '{cfg.data}'" + (f" ({len(labelled)} class folders)" if labelled else "")
    probed = min(len(cases), PROBE_CASES)
    of = "" if probed == len(cases) else f" (first {probed} of {len(cases)} cases)"
    facts = [
        f"  volumes: {len(cases)} case(s), {channels} channel(s); intensity rule: {intensity}; "
        f"cache: {cache if cache is not None else 'off'}",
        f"  spacing seen{of}: {_spacing_text(spacings) if spacings else 'none readable'}; "
        f"{padded} smaller than the crop (padded with the background value)"
        + (f"; {len(damaged)} damaged" if damaged else ""),
    ]
    return VolumeRunData(VolumeSamples(base, cfg.seed), desc, facts, damaged)


def read_knn_volumes(
    root: Path,
    size: tuple[int, ...],
    channels: int,
    mean: Any,
    std: Any,
    batch: int,
    rank: int,
    world_size: int,
    *,
    intensity: str = "percentile",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """This rank's share of a class-folder tree of volumes, centre-cropped: (volumes, labels, indices, classes).

    The k-NN monitor's reader (:class:`~.knn.KnnMonitor`'s ``reader``); ``mean``/``std`` are unused (volumes are
    normalised per volume by the intensity rule). Damaged files are skipped with a warning.
    """
    from . import volumes
    from .knn import shard_indices

    cases = volumes.find_volumes(Path(root), channels=channels)
    classes = sorted({c.label for c in cases if c.label is not None})
    if len(classes) < 2:
        raise RecipeError(
            f"--knn-data '{root}': needs volumes in at least two class folders (one sub-folder per class), "
            f"found {len(classes)}"
        )
    cases = [c for c in cases if c.label is not None]
    if len(cases) > MAX_KNN_VOLUMES:  # an even spread over the classes
        step = len(cases) / MAX_KNN_VOLUMES
        cases = [cases[int(i * step)] for i in range(MAX_KNN_VOLUMES)]
    index_of = {name: i for i, name in enumerate(classes)}
    crop = tuple(int(v) for v in size)
    samples, kept, index = [], [], []
    for i in shard_indices(len(cases), batch, rank, world_size):
        one = volumes.VolumeDataset([cases[i]], crop, intensity=intensity, train=False)
        try:
            x = _sample_of(one[0])
        except Exception as err:  # noqa: BLE001 - a damaged file is skipped, as in the training data
            warn(f"--knn-data: skipped damaged volume '{cases[i].paths[0]}' ({err})")
            continue
        samples.append(x)
        kept.append(index_of[cases[i].label])
        index.append(i)
    readable = sum(dist_utils.all_gather_objects(len(samples)))
    if readable < 2:
        raise RecipeError(f"--knn-data '{root}': fewer than two readable volumes")
    stacked = torch.stack(samples) if samples else torch.zeros(0, channels, *crop)
    return stacked, torch.tensor(kept, dtype=torch.long), torch.tensor(index, dtype=torch.long), classes


def describe_patch(size: Sequence[int], grid: Sequence[int]) -> str:
    """``"patch 16x16x16 -> 4x4x4 cells"`` (per-axis patch and mask grid)."""
    patch = [s // g for s, g in zip(size, grid)]
    return f"patch {'x'.join(map(str, patch))} -> mask grid {'x'.join(map(str, grid))} ({math.prod(grid)} cells)"
