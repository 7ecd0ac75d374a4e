"""Multi-process training through torchrun: process group, device, SyncBatchNorm, small collectives.

``torchrun --nproc-per-node N -m sparsify.recipes.pretrain ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`setup` reads them, picks the device (``cuda:LOCAL_RANK`` when CUDA is present,
else CPU) and the backend (nccl on CUDA, gloo on CPU). Without those variables the run is a single
process and nothing here touches ``torch.distributed``.

BatchNorm statistics are shared across ranks: the user's model is converted to
``nn.SyncBatchNorm`` before sparsify wraps it (sparsify's masked BatchNorm combines the per-rank
counts, means and centred sums of squares for SyncBatchNorm modules), and the decoder's and densify
layers' BatchNorms (1-D, 2-D or 3-D) become ``nn.SyncBatchNorm`` on CUDA or :class:`DistBatchNorm2d`
(1d, 3d) and a cross-rank masked BatchNorm on CPU (PyTorch's SyncBatchNorm refuses CPU tensors).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistEnv",
    "setup",
    "cleanup",
    "all_reduce_sum",
    "all_gather_objects",
    "broadcast_object",
    "barrier",
    "unwrap",
    "broadcast_state",
    "average_gradients",
    "DistBatchNorm1d",
    "DistBatchNorm2d",
    "DistBatchNorm3d",
    "convert_dense_batchnorm",
    "convert_masked_batchnorm",
]


@dataclass
class DistEnv:
    """Where this process sits: rank, world size, local rank, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and prints progress (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(requested: str | None, local_rank: int) -> torch.device:
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def setup(device: str | None = None, timeout_minutes: float = 30.0) -> DistEnv:
    """Initialise the process group when launched by torchrun; return this process's :class:`DistEnv`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"timeout": datetime.timedelta(minutes=timeout_minutes)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        try:
            dist.init_process_group(backend=backend, **kwargs)
        except TypeError:  # older torch without device_id
            kwargs.pop("device_id", None)
            dist.init_process_group(backend=backend, **kwargs)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup(finished: bool = True) -> None:
    """Destroy the process group if this process created one.

    After a run that ``finished`` on every rank, the ranks first meet in a barrier: then no rank tears
    its connections down while a peer still completes the last collective (a gloo rank once aborted
    at exit that way). After a failure the barrier is skipped: the other ranks may never arrive.
    """
    if dist.is_available() and dist.is_initialized():
        if finished and _active():
            try:
                dist.barrier()
            except RuntimeError:  # a peer that failed after all: its own error is the one to report
                pass
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op in a single process); returns it.

    Host-side tensors (the loop's flags and counters) travel through the GPU when the process group is
    NCCL only: NCCL has no CPU path and would refuse them.
    """
    if not _active():
        return tensor
    if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
        buf = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        tensor.copy_(buf.cpu())
        return tensor
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (what DDP does at construction)."""
    if not _active():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=src)


def average_gradients(params: list[torch.Tensor]) -> None:
    """Average gradients over ranks with one flat all-reduce (DDP's job, for CPU runs without DDP).

    A parameter whose gradient is None on every rank keeps None; if only some ranks have one, the
    others count as zeros.
    """
    if not _active():
        return
    world = dist.get_world_size()
    ref = next(iter(params))
    flat = [
        p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=ref.dtype, device=ref.device)
        for p in params
    ]
    present = torch.tensor([p.grad is not None for p in params], dtype=flat[0].dtype, device=ref.device)
    buf = torch.cat([*[f.to(flat[0].dtype) for f in flat], present])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    counts = buf[-len(params) :]
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        if counts[i] > 0:
            g = (buf[offset : offset + n] / world).view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        offset += n


def barrier() -> None:
    """Wait for all ranks (no-op in a single process)."""
    if _active():
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` and ``DistributedDataParallel`` wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: every rank's output depends on every rank's input, so the
    gradient of each input is the sum over ranks of the output gradients (another all-reduce).

    (Our own, because ``torch.distributed.nn.functional.all_reduce`` is deprecated and warns on every rank.)
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        g = grad.contiguous().clone()
        dist.all_reduce(g)
        return g


def _all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(x)


class _DistBatchNorm:
    """A dense BatchNorm (any rank) whose training statistics are all-reduced across ranks, on any device.

    Equivalent to ``nn.SyncBatchNorm`` (gradients flow through the all-reduce), but also runs on CPU
    with the gloo backend. Outside training, or in a single process, it is the plain BatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not (self.training and _active()):
            return super().forward(x)  # type: ignore[misc]

        c = x.shape[1]
        dims = (0, *range(2, x.dim()))
        per_channel = (1, c) + (1,) * (x.dim() - 2)
        xf = x.float()
        count = torch.full((1,), xf.numel() / c, dtype=torch.float32, device=x.device)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        stats = _all_reduce_with_grad(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale = scale * self.weight.float()
            shift = shift * self.weight.float() + self.bias.float()
        y = xf * scale.view(per_channel) + shift.view(per_channel)
        return y.to(x.dtype)


class DistBatchNorm1d(_DistBatchNorm, nn.BatchNorm1d):
    """:class:`DistBatchNorm2d` for (B, C) and (B, C, L) inputs (1-D signal networks' decoders)."""


class DistBatchNorm2d(_DistBatchNorm, nn.BatchNorm2d):
    """A dense BatchNorm2d whose training statistics are all-reduced across ranks, on any device.

    Equivalent to ``nn.SyncBatchNorm`` (gradients flow through the all-reduce), but also runs on CPU
    with the gloo backend. Outside training, or in a single process, it is plain BatchNorm2d.
    """


class DistBatchNorm3d(_DistBatchNorm, nn.BatchNorm3d):
    """:class:`DistBatchNorm2d` for (B, C, D, H, W) inputs (volume networks' decoders)."""


#: The cross-rank replacement of each plain BatchNorm class on devices without SyncBatchNorm.
_DIST_BATCH_NORMS: dict[type, type] = {
    nn.BatchNorm1d: DistBatchNorm1d,
    nn.BatchNorm2d: DistBatchNorm2d,
    nn.BatchNorm3d: DistBatchNorm3d,
}


def convert_dense_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace plain ``nn.BatchNorm1d/2d/3d`` layers (not subclasses) by cross-rank versions, in place.

    CUDA: ``nn.SyncBatchNorm``; other devices: :class:`DistBatchNorm2d` (1d, 3d). Parameters and buffers
    are carried over. Meant for layers sparsify does not rewrite: SparK's decoder, or a model being
    fine-tuned.
    """
    for name, child in list(module.named_children()):
        if type(child) in _DIST_BATCH_NORMS:
            if device.type == "cuda":
                new: nn.Module = nn.SyncBatchNorm.convert_sync_batchnorm(child)
            else:
                new = _DIST_BATCH_NORMS[type(child)](
                    child.num_features,
                    child.eps,
                    child.momentum,
                    child.affine,
                    child.track_running_stats,
                    device=device,
                )
                new.load_state_dict(child.state_dict())
                if child.affine:
                    new.weight.requires_grad_(child.weight.requires_grad)
                    new.bias.requires_grad_(child.bias.requires_grad)
            setattr(module, name, new)
        else:
            convert_dense_batchnorm(child, device)
    return module


def convert_masked_batchnorm(module: nn.Module) -> nn.Module:
    """Make SparK's densify masked BatchNorm layers (every rank) share their statistics across ranks, in place.

    Each such layer's class is switched to a subclass whose training forward all-reduces the masked
    sums and counts (gradients flow through the all-reduce), so that N processes with batch b compute
    what one process with batch N*b would. Parameters, buffers and state_dict names are unchanged.
    """
    from sparsify.spark.densify import MASKED_BATCH_NORMS

    bases = set(MASKED_BATCH_NORMS.values())
    for child in module.modules():
        if type(child) in bases:
            child.__class__ = _dist_masked_batchnorm(type(child))
    return module


_DIST_MASKED_CACHE: dict[type, type] = {}


def _dist_masked_batchnorm(base: type[nn.Module]) -> type[nn.Module]:
    if base in _DIST_MASKED_CACHE:
        return _DIST_MASKED_CACHE[base]

    class DistMaskedBatchNorm(base):  # type: ignore[misc, valid-type]
        """Masked BatchNorm with statistics over the active sites of all ranks."""

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            if not (self.training and _active()):
                return super().forward(x, mask)

            c = x.shape[1]
            dims = (0, *range(2, x.dim()))
            per_channel = (1, c) + (1,) * (x.dim() - 2)
            xf = x.float()
            w = mask.to(xf.dtype)
            local = torch.cat([(xf * w).sum(dims), (xf * xf * w).sum(dims), w.sum().view(1)])
            stats = _all_reduce_with_grad(local)
            count = stats[-1]
            n = count.clamp(min=1.0)
            mean = stats[:c] / n
            var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0.0)
            if self.track_running_stats:
                self._update_running_stats(mean.detach(), var.detach(), count.detach())
            scale = torch.rsqrt(var + self.eps)
            shift = -mean * scale
            if self.affine:
                scale = scale * self.weight.float()
                shift = shift * self.weight.float() + self.bias.float()
            return (xf * scale.view(per_channel) + shift.view(per_channel)).to(x.dtype)

    DistMaskedBatchNorm.__name__ = DistMaskedBatchNorm.__qualname__ = f"Dist{base.__name__}"
    _DIST_MASKED_CACHE[base] = DistMaskedBatchNorm
    return DistMaskedBatchNorm
