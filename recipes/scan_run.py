"""The volume side of ``sparsify-pretrain``: a folder of scans (or the synthetic default) as a training stream.

:mod:`.volumes` reads scans (NIfTI, NumPy, DICOM series), normalises intensities and cuts 3-D crops; this
module fits that into the run the 2-D path already has (:mod:`.train_loop`): samples as
``(volume, label, skipped)`` like :class:`~.data.ImageFiles`'s, one augmentation stream per (seed, epoch,
index) so a resumed run sees the batches an uninterrupted one would, the facts the run header states
(spacing seen, cases padded, damaged files), and the k-NN monitor's reader for class folders of volumes.

A damaged file is named as it is found (a header that cannot be read at the start, or the first batch
that meets it) and in the end summary; the sample is replaced by another case and the run goes on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import distributed as dist_utils
from .cli import RecipeError, warn

__all__ = ["VolumeSamples", "VolumeRunData", "volume_run_data", "read_knn_volumes", "MAX_KNN_VOLUMES"]

#: volumes the k-NN monitor reads at most (held in memory as crops)
MAX_KNN_VOLUMES = 512


class VolumeSamples(torch.utils.data.Dataset):
    """A volume dataset as the training loop reads samples: ``(volume (C, D, H, W), label, skipped)``.

    The crops come from the dataset's own generators, seeded by (seed, epoch, index): a sample depends on
    neither the number of workers nor a resume. ``skipped`` lists ``"path (why)"`` for the damaged files
    met while producing this sample; it travels back with the batch to the main process (the dataset's own
    record lives in whichever worker process read the file).
    """

    def __init__(self, base: Any) -> None:
        self.base = base
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops ``__getitem__`` draws (set before creating an iterator)."""
        self.epoch = int(epoch)
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, tuple[str, ...]]:
        x, label, bad = self.base.sample(index)
        why = getattr(self.base, "damaged", None) or {}
        return x, int(label), tuple(f"{p} ({why.get(p, 'unreadable')})" for p in bad)


class VolumeRunData:
    """What a volume run needs from its data: the dataset, a description and the header's facts."""

    def __init__(self, dataset: VolumeSamples, description: str, facts: list[str], damaged: list[str]) -> None:
        self.dataset = dataset
        self.description = description
        self.facts = facts  # header lines
        self.damaged = damaged  # "path (why)" found by the probe


def volume_run_data(cfg: Any, channels: int, out: Path, is_main: bool = True) -> VolumeRunData:
    """The training samples of a volume run: ``--data`` (a folder of scans) or the synthetic default.

    For a folder, the headers of every case are read first (cheap: no voxels) for the run header's facts:
    the spacings seen, the cases smaller than the crop (padded, or refused by ``--small-volumes refuse``)
    and the files whose header cannot be read (damaged: named now, skipped in training).
    """
    from . import volumes

    crop = tuple(int(v) for v in cfg.input_size)
    if cfg.data is None:
        base = volumes.SyntheticVolumes(int(cfg.sample_length), crop, channels=channels, seed=int(cfg.seed))
        desc = f"{len(base)} synthetic volumes (offline phantoms, no data, no download)"
        facts = ["  volumes: synthetic phantoms made on the fly; intensity rule: percentile (per volume)"]
        return VolumeRunData(VolumeSamples(base), desc, facts, [])
    root = Path(cfg.data).expanduser()
    cases = volumes.find_volumes(root, channels=channels)
    intensity = cfg.intensity or "percentile"
    cache = None
    if (cfg.volume_cache or "").lower() != "none":
        cache = Path(cfg.volume_cache).expanduser() if cfg.volume_cache else out / "volume_cache"
    pad = "refuse" if cfg.small_volumes == "refuse" else "background"
    base = volumes.VolumeDataset(cases, crop, intensity=intensity, cache_dir=cache, pad=pad, train=True, seed=cfg.seed)
    found = base.survey()
    # known damaged from now on (in every worker's copy too): training skips them without reading them again
    base.damaged.update({str(p): "unreadable header" for p in found["unreadable"]})
    damaged = [f"{p} (unreadable header)" for p in found["unreadable"]]
    for entry in damaged if is_main else []:
        warn(f"damaged volume {entry}: it is skipped and the run goes on")
    small = list(found["small"])
    if small and cfg.small_volumes == "refuse":
        raise RecipeError(
            f"{len(small)} volume(s) are smaller than the crop {'x'.join(map(str, crop))} (e.g. '{small[0]}'); use a "
            "smaller --input-size, or --small-volumes pad to pad them with the background value"
        )
    labelled = sorted({c.label for c in cases if c.label is not None})
    desc = f"{len(cases)} volume case(s) under '{cfg.data}'" + (f" ({len(labelled)} class folders)" if labelled else "")
    spacings = sorted(found["spacings"], key=lambda sp: (sp is None, sp or ()))
    spacing_text = ", ".join("unknown" if sp is None else "x".join(f"{v:g}" for v in sp) + " mm" for sp in spacings[:6])
    if len(spacings) > 6:
        spacing_text += f", and {len(spacings) - 6} more"
    facts = [
        f"  volumes: {len(cases)} case(s), {channels} channel(s) each; intensity rule: {intensity}; "
        f"voxel cache: {cache if cache is not None else 'off'}",
        f"  spacing seen (d x h x w): {spacing_text or 'none readable'}; "
        f"{len(small)} case(s) smaller than the crop, padded with the background value"
        + (f"; {len(damaged)} damaged" if damaged else ""),
    ]
    return VolumeRunData(VolumeSamples(base), desc, facts, damaged)


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
            x = one[0]
        except RecipeError:  # its only case is damaged: skipped, as in the training data
            why = next(iter(one.damaged.values()), "unreadable")
            warn(f"--knn-data: skipped damaged volume '{cases[i].paths[0]}' ({why})")
            continue
        samples.append(x)
        kept.append(index_of[cases[i].label])
        index.append(i)
    readable = sum(dist_utils.all_gather_objects(len(samples)))
    if readable < 2:
        raise RecipeError(f"--knn-data '{root}': fewer than two readable volumes")
    stacked = torch.stack(samples) if samples else torch.zeros(0, channels, *crop)
    return stacked, torch.tensor(kept, dtype=torch.long), torch.tensor(index, dtype=torch.long), classes


def _describe_patch(size: Sequence[int], grid: Sequence[int]) -> str:
    """``"patch 16x16x16 -> 4x4x4 cells"`` (per-axis patch and mask grid)."""
    patch = [s // g for s, g in zip(size, grid)]
    return f"patch {'x'.join(map(str, patch))} -> mask grid {'x'.join(map(str, grid))} ({math.prod(grid)} cells)"
