"""A k-NN representation monitor: how well do the encoder's pooled features separate labelled images?

The signal self-supervised users watch during pretraining (DINO and lightly report it): embed a small
labelled set with the encoder as it is now (whole image visible, ``mask=None``, eval mode), globally
average-pool the coarsest feature map, L2-normalise, and classify each image by a similarity-weighted
vote of its k nearest neighbours. ``DIR/train`` + ``DIR/val`` are used as bank and queries when both
exist; otherwise every image is a query against all the others (leave-one-out), so a single small
held-out folder is enough.

**The score is a function of the weights alone.** Eval mode normalises with BatchNorm's running
statistics, and those move during training even when the weights do not (a run at lr 1e-12 used to
gain 19 points between step 0 and step 12 from the running statistics alone). So before each evaluation
every BatchNorm layer's statistics are re-estimated on the monitor's reference images (``train/``, or
all of them), and the training's own running statistics are put back afterwards: two evaluations of
the same weights give the same score, whatever the training did to the buffers in between.

Images are decoded and centre-cropped once, when the monitor is built; an evaluation is then two
forward passes of the encoder over them (statistics, then features; no decoder, no gradients).

**Sharded over ranks.** Under torchrun every rank builds the monitor and evaluates together: the images
are cut into batches of ``batch``, and rank r decodes and embeds batches r, r + W, r + 2W, ... only.
The BatchNorm sums of the statistics pass are all-reduced and the pooled features all-gathered (then put
back in file order), so every rank computes the same score, the same one a single process computes
(the same batches meet the same statistics), and the monitor's cost per rank falls with the world size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as dist_utils
from .cli import RecipeError, warn

__all__ = ["KnnMonitor", "knn_top1", "pooled_features", "batchnorm_statistics_from"]

#: images read from a k-NN folder at most (a monitor must stay cheap; a few hundred are plenty)
MAX_IMAGES = 2000


def knn_top1(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor | None = None,
    query_labels: torch.Tensor | None = None,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of weighted k-NN classification on L2-normalised features.

    Each neighbour votes for its label with weight ``exp(cosine / temperature)`` (as in DINO's k-NN
    evaluation). Without ``queries`` the bank is classified leave-one-out: an image never votes for itself.

    Args:
        bank: (N, D) features of the labelled reference images; bank_labels: (N,) int labels.
        queries, query_labels: (M, D) and (M,) to classify; ``None`` = leave-one-out on the bank.
        k: neighbours (capped at the number available).
        temperature: softness of the similarity weights.
    """
    bank = F.normalize(bank.float(), dim=1)
    loo = queries is None
    q = bank if loo else F.normalize(queries.float(), dim=1)
    q_labels = bank_labels if loo else query_labels
    if q_labels is None or q.shape[0] == 0:
        raise RecipeError("k-NN accuracy needs labelled query images")
    classes = int(max(int(bank_labels.max()), int(q_labels.max()))) + 1
    available = bank.shape[0] - (1 if loo else 0)
    k = max(1, min(int(k), available))
    correct = 0
    for lo in range(0, q.shape[0], 1024):  # bounded memory for the similarity matrix
        sim = q[lo : lo + 1024] @ bank.T
        if loo:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + lo] = -math.inf  # never one's own neighbour
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], classes, device=sim.device)
        votes.scatter_add_(1, bank_labels[idx], (top / temperature).exp())
        correct += int((votes.argmax(1) == q_labels[lo : lo + 1024]).sum())
    return correct / q.shape[0]


@torch.no_grad()
def pooled_features(
    encoder: nn.Module, images: torch.Tensor, batch: int, device: torch.device, autocast_dtype: torch.dtype | None
) -> torch.Tensor:
    """Global average of the coarsest feature map of ``encoder(x)`` (mask None) for every image or volume: (N, C)."""
    out = []
    if images.shape[0] == 0:  # a rank with no share of the images
        return torch.zeros(0, 0)
    for lo in range(0, images.shape[0], batch):
        x = images[lo : lo + batch].to(device, non_blocking=True)
        if autocast_dtype is not None:
            with torch.autocast(device.type, dtype=autocast_dtype):
                feats = encoder(x)
        else:
            feats = encoder(x)
        coarsest = feats[-1].float()
        out.append(coarsest.mean(dim=tuple(range(2, coarsest.dim()))))  # every spatial axis (2-D or 3-D)
    return torch.cat(out)


def _running_batchnorms(encoder: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers (any rank, SyncBatchNorm, timm's BatchNormAct) that normalise with running statistics."""
    return [
        m
        for m in encoder.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


@contextlib.contextmanager
def batchnorm_statistics_from(
    encoder: nn.Module,
    images: torch.Tensor,
    batch: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[None]:
    """Inside the block, ``encoder``'s BatchNorm layers hold statistics estimated on ``images`` alone.

    ``reduce`` (e.g. an all-reduce over ranks) sums each layer's (sum, sum of squares, count) over the
    shards of the images that other processes hold.

    One pass over ``images`` in eval mode, where each BatchNorm normalises with the statistics of its
    own input batch (as in training) and accumulates the mean and variance of its inputs over all of
    ``images``; those become its running statistics for the block. On exit the layers' own statistics
    are restored exactly, so a training run that evaluates this way is not changed by it.

    Eval mode throughout, rather than train mode, so that dropout and drop path stay off (no random
    draws: the training's random streams are untouched) and a SyncBatchNorm never waits for ranks that
    are not evaluating.
    """
    norms = _running_batchnorms(encoder)
    if not norms:
        yield
        return
    saved = [(m.running_mean.detach().clone(), m.running_var.detach().clone()) for m in norms]
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    # sum x, sum x^2, count per layer (tensors from the start: a rank without images still joins the reduce)
    sums: dict[nn.Module, list] = {
        m: [torch.zeros(m.num_features, dtype=acc_dtype, device=m.running_mean.device)] * 2
        + [torch.zeros((), dtype=acc_dtype, device=m.running_mean.device)]
        for m in norms
    }

    def use_batch_statistics(module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        dims = [d for d in range(x.dim()) if d != 1]
        x64 = x.to(torch.float32 if x.device.type == "mps" else torch.float64)  # MPS has no float64
        count = x.numel() // x.shape[1]
        mean = x64.mean(dims)
        module.running_mean.copy_(mean)
        module.running_var.copy_(x64.var(dims, unbiased=False))  # what training normalises with
        acc = sums[module]
        acc[0] = acc[0] + x64.sum(dims)
        acc[1] = acc[1] + (x64 * x64).sum(dims)
        acc[2] = acc[2] + count

    was_training = encoder.training
    encoder.eval()
    handles = [m.register_forward_pre_hook(use_batch_statistics) for m in norms]
    try:
        with torch.no_grad():
            try:
                pooled_features(encoder, images, batch, device, autocast_dtype)
            finally:
                for h in handles:
                    h.remove()
            for m in norms:
                s1, s2, n = sums[m]
                if reduce is not None:
                    s1, s2, n = reduce(torch.cat([s1, s2, n.view(1)])).split([s1.numel(), s2.numel(), 1])
                n = float(n.reshape(()))
                if n == 0:  # a layer the forward never reached keeps its statistics
                    continue
                mean = s1 / n
                var = (s2 / n - mean * mean).clamp_min(0.0) * (n / max(n - 1, 1))  # unbiased, as BatchNorm's
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        encoder.train(was_training)


def shard_indices(n: int, batch: int, rank: int, world_size: int) -> list[int]:
    """The indices of ``n`` items in batches ``rank``, ``rank + world_size``, ... of ``batch`` consecutive items."""
    return [i for lo in range(rank * batch, n, world_size * batch) for i in range(lo, min(lo + batch, n))]


def _read(
    root: Path, size: tuple[int, int], channels: int, mean, std, batch: int, rank: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """This rank's share of the images under ``root``: (images, labels, their indices in file order, classes)."""
    from .data import CenterCrop, find_labelled_images, load_image

    paths, labels, classes = find_labelled_images(root)
    if len(paths) > MAX_IMAGES:  # an even spread over the classes, not the first ones only
        step = len(paths) / MAX_IMAGES
        keep = [int(i * step) for i in range(MAX_IMAGES)]
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    crop = CenterCrop(size, mean=mean, std=std)
    images, kept, index = [], [], []
    for i in shard_indices(len(paths), batch, rank, world_size):
        try:
            images.append(crop(load_image(paths[i], channels)))
        except Exception:  # noqa: BLE001 - an unreadable file is skipped, like in the training data
            continue
        kept.append(labels[i])
        index.append(i)
    readable = sum(dist_utils.all_gather_objects(len(images)))
    if readable < 2:
        raise RecipeError(f"--knn-data '{root}': fewer than two readable images")
    if readable < len(paths) and rank == 0:
        warn(f"--knn-data '{root}': skipped {len(paths) - readable} unreadable image(s)")
    stacked = torch.stack(images) if images else torch.zeros(0, channels, *size)
    return stacked, torch.tensor(kept, dtype=torch.long), torch.tensor(index, dtype=torch.long), classes


def _gathered(features: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (features, labels), in file order (a no-op in a single process)."""
    parts = [p for p in dist_utils.all_gather_objects((features.cpu(), labels, index)) if p[2].numel()]
    feats = torch.cat([f for f, _, _ in parts])
    labs = torch.cat([lab for _, lab, _ in parts])
    order = torch.cat([i for _, _, i in parts]).argsort()
    return feats[order], labs[order]


class KnnMonitor:
    """k-NN top-1 accuracy of an encoder's pooled features on a labelled ImageFolder.

    Args:
        root: ImageFolder (one sub-folder per class), or a folder holding ``train/`` and ``val/`` ones.
        input_size: (H, W) the images are centre-cropped to.
        channels: image channels the encoder takes.
        mean, std: the training normalisation.
        k: neighbours; temperature: similarity weighting (see :func:`knn_top1`).
        batch: images per forward pass.
        rank, world_size: this process's share of the images (see the module notes); every rank must
            build the monitor and call :meth:`evaluate` together.
        reader: reads one class-folder tree as ``reader(root, input_size, channels, mean, std, batch, rank,
            world_size) -> (samples, labels, indices in file order, classes)``; default: image files. Volume
            runs pass one that reads volumes (:mod:`.scan_run`). noun: what the samples are, for the description.
    """

    def __init__(
        self,
        root: str | Path,
        input_size: tuple[int, int],
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        k: int = 20,
        temperature: float = 0.07,
        batch: int = 64,
        rank: int = 0,
        world_size: int = 1,
        reader: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]] | None = None,
        noun: str = "images",
    ) -> None:
        root = Path(root).expanduser()
        read = reader or _read
        if not root.is_dir():
            raise RecipeError(f"--knn-data '{root}' does not exist or is not a folder (a labelled ImageFolder)")
        self.k, self.temperature, self.batch = int(k), float(temperature), max(1, int(batch))
        shard = (input_size, channels, mean, std, self.batch, rank, world_size)
        self.queries: torch.Tensor | None = None
        self.query_labels: torch.Tensor | None = None
        if (root / "train").is_dir() and (root / "val").is_dir():
            self.bank, self.bank_labels, self.bank_index, classes = read(root / "train", *shard)
            self.queries, self.query_labels, self.query_index, val_classes = read(root / "val", *shard)
            if val_classes != classes:
                raise RecipeError(f"--knn-data '{root}': train/ and val/ have different class folders")
        else:
            self.bank, self.bank_labels, self.bank_index, classes = read(root, *shard)
        counts = dist_utils.all_gather_objects((len(self.bank), 0 if self.queries is None else len(self.queries)))
        self.total_bank = sum(c[0] for c in counts)
        self.total_queries = sum(c[1] for c in counts)
        if self.queries is not None:
            self.description = f"{self.total_bank} + {self.total_queries} {noun} (train/val), {len(classes)} classes"
        else:
            self.description = f"{self.total_bank} {noun}, {len(classes)} classes, leave-one-out"
        self.classes = classes

    @property
    def num_images(self) -> int:
        """Images of the monitor, all ranks together."""
        return self.total_bank + self.total_queries

    def evaluate(self, encoder: nn.Module, device: torch.device, autocast_dtype: torch.dtype | None = None) -> float:
        """k-NN top-1 accuracy (0..1) of ``encoder``'s weights now.

        Runs it in eval mode with BatchNorm statistics re-estimated on the reference images (see the
        module notes), then restores its mode and its own running statistics.
        """
        was_training = encoder.training
        encoder.eval()
        try:
            with batchnorm_statistics_from(
                encoder, self.bank, self.batch, device, autocast_dtype, reduce=dist_utils.all_reduce_sum
            ):
                return self._score(encoder, device, autocast_dtype)
        finally:
            encoder.train(was_training)

    def features(
        self, encoder: nn.Module, device: torch.device, autocast_dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(bank features, bank labels, query features, query labels) of all ranks, in file order.

        The encoder as it is: call inside :func:`batchnorm_statistics_from`, as :meth:`evaluate` does.
        """
        bank, labels = _gathered(
            pooled_features(encoder, self.bank, self.batch, device, autocast_dtype), self.bank_labels, self.bank_index
        )
        queries = q_labels = None
        if self.queries is not None and self.query_labels is not None:
            queries, q_labels = _gathered(
                pooled_features(encoder, self.queries, self.batch, device, autocast_dtype),
                self.query_labels,
                self.query_index,
            )
        return bank, labels, queries, q_labels

    def _score(self, encoder: nn.Module, device: torch.device, autocast_dtype: torch.dtype | None) -> float:
        bank, labels, queries, q_labels = self.features(encoder, device, autocast_dtype)
        return knn_top1(bank, labels, queries, q_labels, self.k, self.temperature)
