"""The pretraining loop: builds data, model and optimiser from a :class:`~.config.PretrainConfig`, then trains.

Each step: forward/backward over ``accum`` micro-batches, one all-reduce of (loss, finite flag, stop flag,
images) so every rank takes the same decision, then either the optimiser update or (non-finite loss)
skip-and-restore. Checkpoints go through :class:`~.run_folder.RunFolder`; console output and pictures through
:mod:`.report`.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed as dist_utils
from . import report
from .batching import CPU_MICRO_BATCH, DISTRIBUTED_MICRO_BATCH, PROBE_LIMIT, BatchPlan, largest_fitting, plan_batches
from .cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, RecipeError, format_size, warn
from .config import PROG, PretrainConfig
from .data import (
    GlobalBatchSampler,
    ImageFiles,
    RandomResizedCropFlip,
    SampleImages,
    SkipCounter,
    collate_images,
    default_normalisation,
    estimate_channel_stats,
    find_images,
)
from .divergence import LossHealth, cpu_copy
from .knn import KnnMonitor
from .logs import RunLogger, progress
from .models import build_model, default_drop_path, head_prefixes, load_init, wrap_for_command_line
from .optim import create_optimizer, param_groups, set_lr_and_wd
from .run_folder import RunFolder, release_inherited_locks
from .schedules import lr_at, peak_lr, wd_at
from .stop import StopRequest

__all__ = ["Pretrainer"]


def _sparsify_api() -> tuple[Any, Any, Any, Any]:
    """(wrap, SparK, save_reconstructions, export_backbone) from sparsify."""
    import sparsify

    wrap = getattr(sparsify, "wrap", None)
    if wrap is None:  # pragma: no cover - only while the core is being written
        from sparsify.encoder import wrap  # type: ignore[no-redef]
    try:
        from sparsify import SparK, export_backbone, save_reconstructions  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover
        from sparsify.spark import SparK, export_backbone, save_reconstructions
    return wrap, SparK, save_reconstructions, export_backbone


def _suggest_sizes(size: tuple[int, ...], r: int | tuple[int, ...]) -> str:
    ratios = (r,) * len(size) if isinstance(r, int) else tuple(r)
    return format_size(tuple(max(q, int(round(v / q)) * q) for v, q in zip(size, ratios)))


def _worker_init(_: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    release_inherited_locks()  # the run folder's lock belongs to the main process alone


# ------------------------------------------------------------------------------------------ run
class Pretrainer:
    """One pretraining run: builds everything from a :class:`PretrainConfig`, trains, writes outputs."""

    def __init__(
        self,
        cfg: PretrainConfig,
        env: dist_utils.DistEnv,
        resume_from: Path | None,
        resume_state: dict | None,
    ) -> None:
        self.cfg = cfg
        self.env = env
        self.run_folder = RunFolder(cfg.out)
        self.out = self.run_folder.out
        self.ckpt_dir = self.run_folder.ckpt_dir
        self.resume_from = resume_from
        self.resume_state = resume_state
        self.say = report.say if env.is_main else report.silent

    # ---- data
    def build_data(self, channels: int) -> None:
        cfg = self.cfg
        self.volume_facts: list[str] = []
        self.probe_damaged: list[str] = []
        norm = default_normalisation(channels)
        if cfg.volumes:
            from .scan_run import volume_run_data

            vd = volume_run_data(cfg, channels, self.out, is_main=self.env.is_main)
            # volumes are normalised per volume (the intensity rule): no dataset-wide mean/std to undo
            self.mean, self.std = None, None
            self.dataset = vd.dataset  # type: ignore[assignment]
            self.data_desc = vd.description
            self.volume_facts, self.probe_damaged = vd.facts, vd.damaged
        elif cfg.data is None:
            base = SampleImages(RandomResizedCropFlip(cfg.input_size), channels, cfg.sample_length, cfg.seed)
            if norm is None:
                norm = estimate_channel_stats(images=base.images, channels=channels)
            self.mean, self.std = norm
            base.transform = RandomResizedCropFlip(cfg.input_size, scale=cfg.crop_scale, mean=self.mean, std=self.std)
            self.dataset: ImageFiles | SampleImages = base
            self.data_desc = (
                f"the embedded sample photographs ({len(base.images)} images from scikit-image, random crops)"
            )
        else:
            paths = find_images(cfg.data)
            if norm is None:
                norm = estimate_channel_stats(paths=[str(p) for p in paths], channels=channels)
            self.mean, self.std = norm
            tf = RandomResizedCropFlip(cfg.input_size, scale=cfg.crop_scale, mean=self.mean, std=self.std)
            files = ImageFiles(paths, tf, channels=channels, seed=cfg.seed)
            files.probe()
            self.dataset = files
            self.data_desc = f"{len(paths)} images under '{cfg.data}'"
        self.plan = self.plan_batches(len(self.dataset))
        self.sampler = GlobalBatchSampler(
            len(self.dataset), cfg.batch_size, self.env.world_size, self.env.rank, cfg.accum, cfg.seed
        )
        workers = cfg.workers
        if workers is None:
            workers = 0 if self.env.device.type == "cpu" else min(8, os.cpu_count() or 1)
        self.workers = workers
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=workers,
            collate_fn=collate_images,
            pin_memory=self.env.device.type == "cuda",
            worker_init_fn=_worker_init if workers > 0 else None,
            prefetch_factor=4 if workers > 0 else None,
        )

    # ---- batch
    def plan_batches(self, dataset_len: int) -> BatchPlan:
        """Resolve the global batch, micro-batch and accumulation; record them in the config (checkpoints)."""
        cfg = self.cfg
        plan = plan_batches(
            cfg.batch_size, self.env.world_size, dataset_len, self._micro_cap, cfg.micro_batch, cfg.accum
        )
        cfg.batch_size, cfg.accum = plan.global_batch, plan.accum
        return plan

    def _micro_cap(self, upper: int) -> int:
        """The largest micro-batch <= ``upper`` this device holds (probed on CUDA; a fixed cap elsewhere)."""
        if self.env.device.type != "cuda":
            return min(upper, CPU_MICRO_BATCH)
        if self.env.distributed:
            # A probe that runs out of memory on one rank only would leave the others waiting in a
            # SyncBatchNorm collective: under torchrun, take a safe default and say how to change it.
            size = min(upper, DISTRIBUTED_MICRO_BATCH)
            self.say(f"  micro-batch {size} per GPU (not probed under torchrun; set --micro-batch to change it)")
            return size
        size = largest_fitting(self._fits, min(upper, PROBE_LIMIT))
        self.say(f"  micro-batch {size}: the most of {min(upper, PROBE_LIMIT)} tried that fits in device memory")
        return size

    def _fits(self, size: int) -> bool:
        """Whether one SparK forward and backward of ``size`` images fits in CUDA memory (state restored)."""
        spark, device = self.spark, self.env.device
        buffers = list(spark.buffers())
        saved = [b.detach().clone() for b in buffers]
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.cfg.precision]
        try:
            x = torch.randn(size, self.in_chans, *self.cfg.input_size, device=device)
            if self.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                loss = spark(x)
            loss.float().backward()
            torch.cuda.synchronize(device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            x = loss = None
            spark.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, v in zip(buffers, saved):
                    b.copy_(v)
            torch.cuda.empty_cache()

    # ---- monitoring: k-NN accuracy and reconstruction pictures during the run
    def build_knn(self) -> None:
        """Read the --knn-data images once: each rank its share (the evaluation is sharded over ranks)."""
        cfg = self.cfg
        self.knn: KnnMonitor | None = None
        self.knn_history: list[tuple[int, float]] = []
        self.knn_every = cfg.knn_every
        self._knn_seconds = 0.0
        self._step_times: list[float] = []
        if cfg.knn_data:
            reader = None
            if cfg.volumes:  # class folders of volumes, read and normalised like the training data
                import functools

                from .scan_run import read_knn_volumes

                reader = functools.partial(read_knn_volumes, intensity=cfg.intensity or "percentile")
            self.knn = KnnMonitor(
                cfg.knn_data, cfg.input_size, self.in_chans, self.mean, self.std, k=cfg.knn_k,
                batch=self.plan.micro_batch, rank=self.env.rank, world_size=self.env.world_size, reader=reader,
                noun="volumes" if cfg.volumes else "images",
            )  # fmt: skip

    def knn_schedule(self) -> str:
        if self.knn_every:
            return f"every {self.knn_every} steps and at the end"
        return "at the start, the end, and at an interval measured to cost under 2% of the training time"

    def evaluate_knn(self, step: int) -> None:
        """Evaluate the k-NN monitor now (every rank, together), log it and remember it for the summary."""
        if self.knn is None:
            return
        t0 = time.perf_counter()
        acc = self.knn.evaluate(dist_utils.unwrap(self.spark).encoder, self.env.device, self.autocast_dtype)
        self._knn_seconds = time.perf_counter() - t0
        self.knn_history.append((step, acc))
        if self.logger is not None:
            self.logger.log(step, {"knn_top1": acc, "knn_seconds": self._knn_seconds})

    def after_step(self, step: int, start: int) -> None:
        """Periodic monitoring after optimiser step ``step``: k-NN accuracy and TensorBoard pictures."""
        if self.knn is not None:
            if self.knn_every is None:
                # Choose the interval from measured costs: the first evaluation against the median step.
                self._step_times.append(time.perf_counter())
                if len(self._step_times) == 11:
                    gaps = sorted(b - a for a, b in zip(self._step_times, self._step_times[1:]))
                    per_step = gaps[len(gaps) // 2]
                    every = max(1, math.ceil(self._knn_seconds / (0.02 * max(per_step, 1e-6))))
                    self.knn_every = dist_utils.broadcast_object(every)  # rank 0's timing: every rank evaluates alike
                    # Evaluations fall on start + k * every; say which is the first still ahead, so that
                    # an interval shorter than the measurement itself is not announced as already kept.
                    first = start + -(-(step - start) // self.knn_every) * self.knn_every  # this step counts
                    self.say(
                        f"  k-NN monitor: one evaluation takes {self._knn_seconds:.2g} s, a step {per_step:.2g} s: "
                        f"evaluating at step {min(first, self.total_steps)}, then every {self.knn_every} steps "
                        "(< 2% of training time) and at the end"
                    )
            if step == self.total_steps or (self.knn_every and (step - start) % self.knn_every == 0):
                self.evaluate_knn(step)
        if not self.env.is_main:
            return
        if step % self.vis_every == 0:  # the picture with or without TensorBoard
            path = report.write_reconstructions(self, "recon_latest.png")
            if path is not None and self.logger is not None and self.logger.writer is not None:
                self.logger.add_image("reconstructions", path, step)

    # ---- model
    def build_model(self) -> None:
        cfg = self.cfg
        wrap, SparK, self.save_reconstructions, self.export_backbone = _sparsify_api()
        torch.manual_seed(cfg.seed)
        drop_path = cfg.drop_path if cfg.drop_path is not None else default_drop_path(cfg.model)
        self.drop_path = drop_path
        model = build_model(cfg.model, in_chans=cfg.in_chans, drop_path=drop_path)
        if cfg.init:
            fresh = load_init(model, cfg.init, allow_missing=head_prefixes(model))
            self.say(f"initialised from {cfg.init}" + (f" ({len(fresh)} head tensors left fresh)" if fresh else ""))
        if self.env.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.env.device)
        self.user_model = model
        first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
        if cfg.volumes and first is not None and not isinstance(first, nn.Conv3d):
            from .models import SMALL_RESNET3D

            source = f"the --data folder '{cfg.data}' holds volumes" if cfg.data else "--volumes"
            raise RecipeError(
                f"{cfg.model} is not a 3-D network (its first convolution is {type(first).__name__}), but this run "
                f"trains on 3-D volumes ({source}); give a 3-D network with --model (your own file.py:function, a "
                f"MONAI or nnU-Net network, or {SMALL_RESNET3D})"
            )
        enc = wrap_for_command_line(wrap, model, cfg.input_size)  # a size that does not fit: the library's words
        size = tuple(cfg.input_size)
        rank = int(getattr(enc, "spatial_dims", 2))
        if rank != len(size):
            kind = {2: "images (2-D)", 3: "volumes (3-D)"}
            raise RecipeError(
                f"{cfg.model} is a {rank}-D network but this run trains on {kind.get(len(size), len(size))}; "
                + ("pass --volumes or a folder of volumes, or give a 3-D model" if rank == 3 else
                   "give a 3-D model with --model, or train on images")
            )  # fmt: skip
        patch = enc.patch_size
        ratios = (int(patch),) * rank if isinstance(patch, int) else tuple(int(v) for v in patch)
        if any(v % q for v, q in zip(size, ratios)):
            ratio = ratios[0] if len(set(ratios)) == 1 else "x".join(map(str, ratios))
            raise RecipeError(
                f"--input-size {format_size(size)} is not a multiple of {cfg.model}'s "
                f"downsample ratio "
                f"{ratio}; use e.g. --input-size {_suggest_sizes(size, ratios)}"
            )
        self.grid = tuple(v // q for v, q in zip(size, ratios))
        self.mask_ratio = cfg.mask_ratio if cfg.mask_ratio is not None else (0.75 if min(size) >= 384 else 0.6)
        num = math.prod(self.grid)
        visible = max(1, int(round(num * (1.0 - self.mask_ratio))))
        if visible >= num:
            unit = "voxels" if rank == 3 else "px"
            raise RecipeError(
                f"at {format_size(size)} {unit} the model sees only {num} patch(es) of {format_size(ratios)} {unit}, "
                f"and mask ratio "
                f"{self.mask_ratio} masks none of them; use a larger --input-size (e.g. {4 * max(ratios)})"
            )
        self.visible = visible
        spark = SparK(enc, mask_ratio=self.mask_ratio, decoder_width=cfg.decoder_width, densify_norm=cfg.densify_norm)
        spark.to(self.env.device)
        if self.env.distributed:
            dist_utils.convert_dense_batchnorm(spark.decoder, self.env.device)
            dist_utils.convert_dense_batchnorm(spark.densify, self.env.device)
            dist_utils.convert_masked_batchnorm(spark)
        if cfg.channels_last:
            spark.to(memory_format=torch.channels_last)
        self.spark = spark
        self.enc = enc
        self.in_chans = int(enc.in_chans)
        self.norm_type = getattr(enc, "norm_type", "batch")

    # ---- optimiser and schedule
    def build_optimiser(self) -> None:
        cfg = self.cfg
        self.steps_per_epoch = self.sampler.steps_per_epoch
        if cfg.steps is not None:
            self.total_steps = int(cfg.steps)
        else:
            self.total_steps = max(1, int(math.ceil(float(cfg.epochs) * self.steps_per_epoch)))
        if cfg.warmup_steps is not None:
            warmup = int(cfg.warmup_steps)
        else:
            warmup = int(round(float(cfg.warmup) * self.steps_per_epoch))
            if warmup > self.total_steps // 4 and "warmup" not in self.explicit:
                warmup = self.total_steps // 4
        self.warmup_steps = min(warmup, self.total_steps)
        self.peak_lr = cfg.lr if cfg.lr is not None else peak_lr(cfg.base_lr, cfg.batch_size, cfg.lr_rule, cfg.min_lr)
        groups = param_groups(self.spark.named_parameters(), cfg.weight_decay)
        self.optimizer = create_optimizer(
            groups, lr=self.peak_lr, weight_decay=cfg.weight_decay, norm_type=self.norm_type, opt=cfg.opt
        )
        self.params = [p for g in groups for p in g["params"]]
        if cfg.precision == "fp16" and self.env.device.type != "cuda":
            raise RecipeError("--precision fp16 needs a CUDA device; on CPU use --precision bf16 or fp32")
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.flag_dtype = torch.float32 if self.env.device.type == "mps" else torch.float64  # MPS has no fp64
        if cfg.save_every is not None:
            self.save_every = cfg.save_every
        else:  # every epoch, but not more often than every 100 steps (small folders) nor less than every 1000
            self.save_every = min(1000, max(self.steps_per_epoch, 100))

    # ---- checkpoints
    def save_due(self) -> bool:
        """Whether ``--save-minutes`` passed since the last checkpoint (or the start of this run)."""
        minutes = self.cfg.save_minutes
        return bool(minutes) and time.monotonic() - self._last_save >= 60.0 * minutes

    def save(self, step: int, defer: bool = False) -> Path | None:
        """Checkpoint ``step`` now, or (``defer``) hold it back until the next finite loss judges its weights."""
        self._last_save = time.monotonic()
        rngs = dist_utils.all_gather_objects(ckpt.rng_state(self.mask_gen))
        bad = sorted(set().union(*dist_utils.all_gather_objects(sorted(self.skipped.paths))))
        path = None
        if self.env.is_main:
            state = {
                "format": ckpt.CHECKPOINT_FORMAT,
                "step": step,
                "total_steps": self.total_steps,
                "model": dist_utils.unwrap(self.spark).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": rngs,
                "world_size": self.env.world_size,
                "data": {
                    "steps_per_epoch": self.steps_per_epoch,
                    "dataset_len": len(self.dataset),
                    "epoch": step // self.steps_per_epoch,
                    "step_in_epoch": step % self.steps_per_epoch,
                },
                "config": self.cfg.to_dict(),
                # where the run started: a relative --model factory path is read from there later
                "cwd": os.getcwd(),
                "skipped_files": bad,
                "first_loss": self.first_loss,
                # what the config left to the model (None there): resume checks compare against these
                "resolved": {"in_chans": self.in_chans, "mask_ratio": self.mask_ratio},
                "recent_losses": self.health.state(),
                "lr_scale": self.lr_scale,
                "rollbacks": self.rollbacks,
            }
            if defer:
                self.pending = (step, cpu_copy(state))  # frozen: training goes on changing the live tensors
            else:
                path = self.run_folder.save_checkpoint(state, step, self.cfg.keep)
        if defer:
            self.pending_step = step
        dist_utils.barrier()
        return path

    def judge_pending(self, problem: str | None) -> None:
        """Write the held-back checkpoint if the loss of its weights was healthy (``problem`` None), else drop it.

        Called on every rank with the same ``problem`` (the step's decision is global).
        """
        if self.pending_step is None:
            return
        step, self.pending_step = self.pending_step, None
        if self.env.is_main and self.pending is not None:
            pending_step, state = self.pending
            self.pending = None
            if problem is None:
                self.run_folder.save_checkpoint(state, pending_step, self.cfg.keep)
            else:
                warn(
                    f"not saving the checkpoint of step {step}: its weights gave a {problem} at the next step; "
                    f"the last good checkpoint is {self.run_folder.latest() or 'none yet'}"
                )
        dist_utils.barrier()

    def lower_lr_advice(self) -> str:
        """The flag to resume with after divergence: the default rule's lr if this run's is above it, else 10x lower."""
        cfg = self.cfg
        current = self.peak_lr * self.lr_scale
        rule = peak_lr(cfg.base_lr, cfg.batch_size, cfg.lr_rule, cfg.min_lr)
        suggestion = rule if current > 1.0001 * rule else current / 10
        return f"--lr {suggestion:.3g}"

    def rollback(self, step: int) -> bool:
        """Reload the newest (good) checkpoint's weights and optimiser state and scale the lr down.

        The step counter, the schedule and the data stream go on from ``step``: the batches since the checkpoint,
        the offending ones among them, are skipped. Returns False when there is no checkpoint to go back to.
        """
        path = self.run_folder.latest()
        if path is None:
            return False
        state, path = ckpt.load_checkpoint(path)
        dist_utils.unwrap(self.spark).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.health = LossHealth(self.cfg.spike_factor, state.get("recent_losses") or ())
        self.rollbacks += 1
        self.lr_scale *= self.cfg.rollback_lr_factor
        if self.env.is_main:
            warn(
                f"diverged: rollback {self.rollbacks}/{self.cfg.max_rollbacks} to {path} (step {state['step']}); "
                f"learning rate x{self.lr_scale:.3g} from now on; the batches of steps {int(state['step']) + 1}-{step} "
                "are skipped"
            )
        if self.logger is not None:
            row = {"rollback": self.rollbacks, "rollback_to": int(state["step"]), "lr_scale": self.lr_scale}
            self.logger.log(step, row)
        return True

    def restore(self) -> int:
        state = self.resume_state
        assert state is not None
        dist_utils.unwrap(self.spark).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rngs = state.get("rng") or []
        if len(rngs) == self.env.world_size:
            ckpt.set_rng_state(rngs[self.env.rank], self.mask_gen)
        else:
            if self.env.is_main:
                warn(
                    f"the checkpoint was written by {len(rngs)} process(es), this run has "
                    f"{self.env.world_size}; random streams restart "
                    "(results will differ from an uninterrupted run)"
                )
            if rngs:
                self.mask_gen.set_state(rngs[0]["mask_generator"])
        data = state.get("data", {})
        if data.get("dataset_len") not in (None, len(self.dataset)) and self.env.is_main:
            warn(
                f"the data changed since the checkpoint "
                f"({data.get('dataset_len')} -> {len(self.dataset)} samples); "
                "continuing from the same step with the new data"
            )
        self.skipped = SkipCounter(state.get("skipped_files", []), noun=self.skipped.noun)
        self.first_loss = state.get("first_loss")
        self.health = LossHealth(self.cfg.spike_factor, state.get("recent_losses") or ())
        self.rollbacks = int(state.get("rollbacks") or 0)
        # A new learning rate on the command line replaces what earlier rollbacks made of the old one.
        if "lr" not in self.explicit and "base_lr" not in self.explicit:
            self.lr_scale = float(state.get("lr_scale") or 1.0)
        return int(state["step"])

    # ---- the loop
    def run(self, explicit: dict[str, Any]) -> int:
        cfg, env = self.cfg, self.env
        self.explicit = explicit
        self.mask_gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
        self.skipped = SkipCounter(noun="volume" if cfg.volumes else "image")
        self.first_loss: float | None = None
        self.health = LossHealth(cfg.spike_factor)
        self.lr_scale = 1.0
        self.rollbacks = 0
        self.pending: tuple[int, dict] | None = None  # a checkpoint held back until its weights are judged
        self.pending_step: int | None = None
        if cfg.data is not None and cfg.volumes:
            from .volumes import find_volumes

            find_volumes(Path(cfg.data).expanduser())  # a missing or empty folder stops before the model is built
        elif cfg.data is not None:
            find_images(cfg.data)  # a missing or empty folder stops before the model is built
        self.build_model()
        self.build_data(self.in_chans)
        self.build_optimiser()
        start = 0
        torch.manual_seed(cfg.seed * 1009 + env.rank + 1)  # drop path etc.: one stream per rank
        if self.resume_state is not None:
            start = self.restore()  # restores every RNG stream as well
        self.skipped.update(self.probe_damaged, report=False)  # the probe named them already
        self.vis = report.vis_batch(self) if env.is_main else None
        self.vis_every = cfg.vis_every or max(1, self.total_steps // 10)
        self.build_knn()
        report.header(self, start)

        self.logger = (
            RunLogger(
                self.out,
                resume_step=start if self.resume_state is not None else None,
                tensorboard=cfg.tensorboard,
            )
            if env.is_main
            else None
        )
        if env.is_main:
            self.run_folder.prepare(cfg.to_dict())
        if start == 0 and env.is_main:
            path = report.write_reconstructions(self, "recon_start.png")
            if path is not None and self.logger is not None:
                self.logger.add_image("reconstructions/start", path, 0)
        self.evaluate_knn(start)

        if start >= self.total_steps:
            self.say(
                f"this run is already complete ({start}/{self.total_steps} steps); pass a larger --steps or "
                "--epochs to continue it, or a new --out to start another"
            )
            outputs = report.finish_outputs(self)
            report.summary(self, outputs, losses=[])
            if self.logger is not None:
                self.logger.close()
            return EXIT_OK

        spark = self.spark
        model: nn.Module = spark
        # CUDA: DistributedDataParallel. CPU (gloo): PyTorch's DDP refuses the SyncBatchNorm layers, so
        # gradients are averaged by one flat all-reduce after backward instead (same result).
        self.manual_sync = env.distributed and env.device.type != "cuda"
        if env.distributed and not self.manual_sync:
            model = nn.parallel.DistributedDataParallel(spark, device_ids=[env.device])
        elif self.manual_sync:
            dist_utils.broadcast_state(spark)
        if cfg.compile:
            model = torch.compile(model)
        spark.train()
        self.buffers = list(spark.buffers())

        code = EXIT_OK
        losses: list[tuple[int, float]] = []
        bad_streak = 0
        streak_nonfinite = True  # whether every bad step of the current streak was non-finite (not a spike)
        successes = 0
        bar = progress(self.total_steps, start, env.is_main)
        step = start
        it = None
        t_last = time.perf_counter()
        self._last_save = time.monotonic()  # --save-minutes counts from here
        with StopRequest(env.is_main) as stop:
            try:
                while step < self.total_steps:
                    epoch, in_epoch = divmod(step, self.steps_per_epoch)
                    if it is None or in_epoch == 0:
                        self.dataset.set_epoch(epoch)
                        self.sampler.set_epoch(epoch, in_epoch)
                        it = iter(self.loader)
                    lr = lr_at(step, self.total_steps, self.peak_lr, self.warmup_steps) * self.lr_scale
                    wd = wd_at(step, self.total_steps, cfg.weight_decay, cfg.weight_decay_end)
                    set_lr_and_wd(self.optimizer, lr, wd)
                    backup = [b.detach().clone() for b in self.buffers]
                    loss_sum, images = self.train_step(model, it)
                    loss_sum = torch.as_tensor(loss_sum, dtype=torch.float32, device=env.device)  # (float: tests)
                    grad_norm_t = self.prepare_update()
                    # Everything the step's decision needs, in ONE host read (the losses, the gradient norm
                    # and the finiteness checks stay on the device until here): GPU work is not serialised
                    # by per-micro-step reads. The flags are summed over ranks, so all decide alike.
                    flags = torch.stack(
                        [
                            loss_sum.detach().to(self.flag_dtype),
                            (~torch.isfinite(loss_sum.detach())).to(self.flag_dtype),
                            torch.tensor(1.0 if stop.reason else 0.0, dtype=self.flag_dtype, device=env.device),
                            torch.tensor(float(images), dtype=self.flag_dtype, device=env.device),
                            self._buffers_nonfinite().to(self.flag_dtype),
                            (~torch.isfinite(grad_norm_t)).to(self.flag_dtype),
                            grad_norm_t.detach().to(self.flag_dtype),
                            # the last entry: some rank's clock says a time-interval checkpoint is due
                            torch.tensor(float(self.save_due()), dtype=self.flag_dtype, device=env.device),
                        ]
                    )
                    dist_utils.all_reduce_sum(flags)
                    vals = flags.tolist()
                    loss = vals[0] / env.world_size
                    # A finite but huge loss can still overflow a running variance: that step is bad too.
                    # (fp16: the grad scaler itself skips steps with inf/NaN gradients and lowers its scale.)
                    finite = vals[1] == 0 and vals[4] == 0 and (vals[5] == 0 or self.scaler is not None)
                    grad_norm = vals[6] / env.world_size if finite else None
                    # The loss was computed on the weights before this update: it judges a held-back checkpoint.
                    spike = self.health.problem(loss) if vals[1] == 0 else None
                    if vals[1] == 0:
                        self.judge_pending(spike)
                    step_done = finite and spike is None
                    if step_done:
                        self.apply_update()
                        self.health.record(loss)
                        bad_streak = 0
                        streak_nonfinite = True
                        successes += 1
                    else:
                        self.discard_update()
                        with torch.no_grad():  # undo what the bad forward did to BatchNorm statistics
                            for b, saved in zip(self.buffers, backup):
                                b.copy_(saved)
                        bad_streak += 1
                        streak_nonfinite = streak_nonfinite and spike is None
                        if spike is not None:
                            what = spike
                        else:
                            what = "non-finite " + (
                                "loss" if vals[1] else ("BatchNorm running statistics" if vals[4] else "gradients")
                            )
                        then = "rolling back" if cfg.on_divergence == "rollback" else "stopping"
                        if env.is_main:
                            warn(
                                f"{what} at step {step + 1}; skipped this update and restored the "
                                f"running statistics ({bad_streak} in a row, {then} at {cfg.max_bad_steps})"
                            )
                        if bad_streak >= cfg.max_bad_steps:
                            # A checkpoint still held back was judged by no finite loss: keep it (it may be fine).
                            self.judge_pending(None)
                            if (
                                cfg.on_divergence == "rollback"
                                and self.rollbacks < cfg.max_rollbacks
                                and self.rollback(step + 1)
                            ):
                                bad_streak = 0
                                streak_nonfinite = True
                                step += 1
                                continue
                            self.report_divergence(step, bad_streak, streak_nonfinite)
                            code = EXIT_FAILED
                            break
                    step += 1
                    if step_done:
                        now = time.perf_counter()
                        ips = vals[3] / max(1e-9, now - t_last)
                        t_last = now
                        if self.first_loss is None:
                            self.first_loss = loss
                        losses.append((step, loss))
                        if env.is_main:
                            bar.update(1)
                            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                            if step % cfg.log_every == 0 or step == self.total_steps or step == start + 1:
                                self.logger.log(
                                    step,
                                    {
                                        "loss": loss,
                                        "lr": lr,
                                        "weight_decay": wd,
                                        "grad_norm": grad_norm,
                                        "epoch": step / self.steps_per_epoch,
                                        "images_per_s": ips,
                                        "skipped_files": self.skipped.count,
                                    },
                                )
                    else:
                        t_last = time.perf_counter()
                        if env.is_main:
                            bar.update(1)
                    if step_done:
                        self.after_step(step, start)
                    stopping = vals[2] > 0
                    periodic = (
                        step % self.save_every == 0 or step == self.total_steps or vals[-1] > 0
                    ) and bad_streak == 0
                    if periodic or stopping:
                        # Held back until the next finite loss judges its weights, unless nothing comes after it.
                        self.save(step, defer=not stopping and step < self.total_steps)
                    if stopping:
                        bar.close()
                        self.say(
                            f"stopped by {stop.reason or 'another process'} "
                            f"at step {step}/{self.total_steps}; "
                            f"checkpoint saved in {self.ckpt_dir}; run the same command again to resume"
                        )
                        code = EXIT_INTERRUPTED
                        break
            finally:
                bar.close()
                it = None
        if code in (EXIT_OK, EXIT_INTERRUPTED):
            self.judge_pending(None)  # a checkpoint still held back (the run ended on bad steps): nothing judged it

        if code == EXIT_OK and successes == 0 and step > start:
            # Every step of this run was skipped: nothing was learned and nothing new was saved.
            self.say(
                f"{PROG}: error: none of the {step - start} steps of this run succeeded (all had non-finite "
                f"values); no checkpoint was written. The last good checkpoint is "
                f"{self.run_folder.latest() or 'none'}. Try a lower --base-lr, --precision fp32, or check the data.",
                file=sys.stderr,
            )
            code = EXIT_FAILED
        if code == EXIT_OK:
            outputs = report.finish_outputs(self)
            report.summary(self, outputs, losses)
        if self.logger is not None:
            self.logger.close()
        return code

    def report_divergence(self, step: int, bad_streak: int, nonfinite: bool) -> None:
        """The error printed when a run stops on divergence: which steps, the checkpoint, what to change."""
        latest = self.run_folder.latest()
        what = "not finite" if nonfinite else "not healthy (a spike or not finite)"
        if self.cfg.on_divergence == "rollback":
            what += f" after {self.rollbacks} rollback(s)" if self.rollbacks else " (no checkpoint to roll back to)"
        where = (
            f"The last good checkpoint is {latest}: run the same command with {self.lower_lr_advice()} to resume "
            "from it (--resume auto)"
            if latest
            else f"No good checkpoint was written yet: run the same command with {self.lower_lr_advice()} to start over"
        )
        self.say(
            f"{PROG}: error: the loss was {what} for {bad_streak} steps in a row "
            f"(steps {step + 2 - bad_streak}-{step + 1}); stopping. {where}; or add --on-divergence rollback to "
            "do this automatically. Otherwise try --precision fp32, or check the data.",
            file=sys.stderr,
        )

    def train_step(self, model: nn.Module, it: Any) -> tuple[torch.Tensor, int]:
        """Forward and backward over ``accum`` micro-batches; returns (mean loss on the device, images here)."""
        cfg, env = self.cfg, self.env
        total: torch.Tensor | None = None
        images = 0
        for micro in range(cfg.accum):
            x, _, bad = next(it)
            if bad:
                self.skipped.update(bad, report=True)
            global_micro = self.sampler.local_batch * env.world_size
            from sparsify.masking import random_mask

            mask = random_mask(global_micro, self.grid, self.mask_ratio, generator=self.mask_gen)
            lo = env.rank * self.sampler.local_batch
            mask = mask[lo : lo + self.sampler.local_batch]
            x = x.to(env.device, non_blocking=True)
            mask = mask.to(env.device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            sync = contextlib.nullcontext()
            if env.distributed and micro < cfg.accum - 1 and hasattr(model, "no_sync"):
                sync = model.no_sync()
            autocast = (
                torch.autocast(env.device.type, dtype=self.autocast_dtype)
                if self.autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with sync:
                with autocast:
                    loss = model(x, mask=mask, check_mask=False)  # masks >= 1 patch (checked at start)
                scaled = loss.float() / cfg.accum
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            detached = loss.detach().float() / cfg.accum
            total = detached if total is None else total + detached  # on the device: no host read here
            images += x.shape[0]
        return total, images

    def _buffers_nonfinite(self) -> torch.Tensor:
        """A device flag: whether some floating-point buffer (BatchNorm running statistics) is not finite."""
        floats = [b for b in self.buffers if b.is_floating_point()]
        if not floats:
            return torch.zeros((), dtype=torch.bool, device=self.env.device)
        return ~torch.isfinite(torch.cat([b.reshape(-1).float() for b in floats])).all()  # few kernels

    def prepare_update(self) -> torch.Tensor:
        """Average gradients over ranks (gloo), unscale (fp16) and clip; returns the pre-clip norm on the device."""
        if self.manual_sync:
            dist_utils.average_gradients(self.params)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.clip_grad if self.cfg.clip_grad and self.cfg.clip_grad > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(self.params, clip)

    def apply_update(self) -> None:
        """Optimiser step on the prepared gradients, then zero them."""
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def discard_update(self) -> None:
        """Drop this step's gradients (a bad step); the grad scaler backs off as for an overflow."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:  # unscale_ ran: the scaler must be updated before its next use
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
