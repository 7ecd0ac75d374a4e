"""Volume loading against the SparK step: is the data loader the bottleneck for compressed scans?

Writes ``--n`` synthetic int16 ``.nii.gz`` phantoms of ``--volume`` voxels (CT-like values) into a
temporary folder, then measures samples/s of :class:`~sparsify.recipes.volumes.VolumeDataset` for
random crops of ``--crop`` in batches of ``--batch``:

* ``no cache``: every sample decompresses its whole file (epoch 1 includes the per-volume statistics,
  epoch 2 reuses them);
* ``cache, first epoch``: a new run with an empty cache folder (decompress once, write ``.npy``);
* ``warm cache``: a new run whose cache folder is already filled (memory-mapped crops only);

and the median time of a SparK step (forward, backward, AdamW) of a small 3-D network on one such
batch. The ratio loader-time-per-batch / step-time says whether the loader keeps up (< 1 means yes).
Times are wall-clock, so with ``--workers W`` they include the workers' parallelism (and their start
at each epoch, which weighs on runs this short). ``--device cuda`` times the step on a GPU, where it is
far shorter than on a CPU and the ratio matters.

    python -m benchmarks.volume_loader [--threads N] [--workers W] [--model small|monai:resnet10|tv:r3d_18]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader


def _write_volumes(folder: Path, n: int, size: tuple[int, int, int]) -> list[Path]:
    import nibabel as nib
    from sparsify.recipes._synthetic_volumes import phantom

    paths = []
    for i in range(n):
        vol, _ = phantom(i, size, 1, seed=0)
        hu = (vol[0] * 1200.0 - 1000.0).astype(np.int16).transpose(2, 1, 0)  # (z, y, x) -> NIfTI (x, y, z)
        path = folder / f"case{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.7, 0.7, 1.0])), str(path))
        paths.append(path)
    return paths


def _epoch(ds, batch: int, workers: int, epoch: int) -> tuple[float, torch.Tensor]:
    """Seconds for one pass over ``ds`` and its first batch."""
    ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=False, drop_last=True)
    t0 = time.perf_counter()
    first = None
    for x in loader:
        first = x if first is None else first
    return time.perf_counter() - t0, first


def _small_net() -> torch.nn.Module:
    """A small 3-D CNN (used when MONAI is missing): three stride-2 conv/BN/ReLU stages."""
    from torch import nn

    layers, cin = [], 1
    for cout in (16, 32, 64, 128):
        layers += [nn.Conv3d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]
        cin = cout
    return nn.Sequential(*layers)


def _step_seconds(model_name: str, x: torch.Tensor, repeats: int, decoder_width: int, device: str) -> float:
    import sparsify
    from sparsify.spark import SparK

    if model_name == "small":
        model = _small_net()
    else:
        from .step import build_model

        model = build_model(model_name, in_chans=1)
    enc = sparsify.wrap(model, input_size=tuple(x.shape[2:]), in_chans=1)
    spark = SparK(enc, decoder_width=decoder_width).to(device).train()
    x = x.to(device)
    opt = torch.optim.AdamW(spark.parameters(), lr=1e-4)
    times = []
    for k in range(repeats + 1):
        t0 = time.perf_counter()
        loss = spark(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        if k:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    from sparsify.recipes.volumes import VolumeDataset, find_volumes

    parser = argparse.ArgumentParser(prog="python -m benchmarks.volume_loader", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: the main process)")
    parser.add_argument("--n", type=int, default=8, help="number of volumes")
    parser.add_argument("--volume", default="160x192x160", help="volume size DxHxW")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--model", default="small", help="benchmarks.step model name, or 'small'")
    parser.add_argument("--steps", type=int, default=3, help="timed SparK steps (after one warm-up)")
    parser.add_argument("--device", default="cpu", help="where the SparK step runs (the loader is always on the CPU)")
    parser.add_argument("--decoder-width", type=int, default=128, help="SparK decoder width (the recipe's CPU preset)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = tuple(int(v) for v in args.volume.lower().split("x"))
    crop = (args.crop,) * 3
    samples = args.n - args.n % args.batch
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = Path(tmp) / "data", Path(tmp) / "cache"
        data.mkdir()
        t0 = time.perf_counter()
        _write_volumes(data, args.n, size)  # type: ignore[arg-type]
        mib = sum(p.stat().st_size for p in data.iterdir()) / 2**20
        print(f"wrote {args.n} int16 .nii.gz of {args.volume} ({mib:.1f} MiB) in {time.perf_counter() - t0:.1f} s")
        cases = find_volumes(data)

        def make(cache_dir: Path | None) -> VolumeDataset:
            return VolumeDataset(cases, crop, intensity="ct:soft", cache_dir=cache_dir, seed=0)

        plain = make(None)
        rows.append(("no cache, epoch 1 (with statistics)", _epoch(plain, args.batch, args.workers, 0)[0]))
        rows.append(("no cache, epoch 2", _epoch(plain, args.batch, args.workers, 1)[0]))
        rows.append(("cache, first epoch (decompress + write)", _epoch(make(cache), args.batch, args.workers, 0)[0]))
        warm = make(cache)
        seconds, batch = _epoch(warm, args.batch, args.workers, 0)
        rows.append(("warm cache, new run, epoch 1", seconds))
        rows.append(("warm cache, epoch 2", _epoch(warm, args.batch, args.workers, 1)[0]))
        cached_mib = sum(p.stat().st_size for p in cache.glob("*.npy")) / 2**20
    print(f"crop {args.crop}^3, batch {args.batch}, {args.workers} workers, {torch.get_num_threads()} threads")
    print(f"cache: {cached_mib:.1f} MiB of .npy")
    for name, seconds in rows:
        per_batch = seconds / (samples // args.batch)
        print(f"  {name:42s} {samples / seconds:8.2f} samples/s  {per_batch * 1000:8.1f} ms/batch")
    step = _step_seconds(args.model, batch, args.steps, args.decoder_width, args.device)
    print(
        f"SparK step on {args.device} ({args.model}, decoder width {args.decoder_width}, batch {tuple(batch.shape)}): "
        f"{step * 1000:.1f} ms (median of {args.steps})"
    )
    for name, seconds in rows:
        if "epoch 2" in name:
            ratio = seconds / (samples // args.batch) / step
            print(f"  loader/step ratio, {name}: {ratio:.3f}")


if __name__ == "__main__":
    main()
