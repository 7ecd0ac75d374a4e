"""The fine-tuning loop: builds the classifier and data from resolved settings, trains, evaluates, checkpoints.

A checkpoint holds everything an exact resume needs (model, optimiser, scaler, step, the RNG states of
every rank, the best accuracy and the per-epoch history, the running loss of the current epoch), so a
run stopped by SIGTERM or killed and started again ends exactly where an uninterrupted run would (CPU).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, RecipeError, format_size, parse_crop_scale, parse_size, warn
from .data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CenterCrop,
    GlobalBatchSampler,
    ImageFiles,
    RandomResizedCropFlip,
    SkipCounter,
    collate_images,
    estimate_channel_stats,
)
from .logs import RunLogger, progress
from .models import backbone_header, build_model, classifier_names, head_prefixes, load_init
from .optim import param_groups, set_lr_and_wd
from .run_folder import RunFolder, release_inherited_locks
from .schedules import lr_at, peak_lr
from .stop import StopRequest

__all__ = ["FINETUNE_FORMAT", "Finetuner"]

FINETUNE_FORMAT = "sparsify-finetune/1"
PROG = "sparsify-finetune"


def _worker_init(_: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    release_inherited_locks()


def input_channels(model: nn.Module, size: tuple[int, int]) -> int:
    """The image channels ``model`` runs on: its first convolution's input channels, or fewer where a
    space-to-depth stem (TResNet, pixel_unshuffle) multiplies them by k*k before it.

    Only when the first convolution's count does not run is c / k^2 tried (k = 2, 3, ...), each with one
    eval-mode forward of a blank image; the first count the model runs on wins.
    """
    from sparsify.encoder import in_chans_candidates

    first = next((int(m.in_channels) for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    candidates = in_chans_candidates(first, 2)
    if len(candidates) == 1:
        return first
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for chans in candidates:
            try:
                with torch.no_grad():
                    model(torch.zeros(1, chans, *size))
            except (RuntimeError, ValueError):  # the wrong channel count: a shape mismatch somewhere inside
                continue
            return chans
    finally:
        for m, training in modes:
            m.training = training
    return first


class Finetuner:
    """One fine-tuning (or linear-probing) run."""

    def __init__(
        self,
        s: dict[str, Any],
        env: dist_utils.DistEnv,
        folder: RunFolder,
        data: dict[str, Any],
        resume_from: Path | None,
        state: dict | None,
    ) -> None:
        self.s = s
        self.env = env
        self.folder = folder
        self.out = folder.out
        self.data = data
        self.resume_from = resume_from
        self.state = state
        self.say = (lambda *a, **k: print(*a, **k, flush=True)) if env.is_main else (lambda *a, **k: None)

    # ---- building
    def build(self) -> None:
        s, env = self.s, self.env
        classes = self.data["classes"]
        size = parse_size(s["input_size"])
        self.size = size
        torch.manual_seed(s["seed"])
        try:
            model = build_model(
                s["model"], num_classes=len(classes), in_chans=s["in_chans"], drop_path=s["drop_path"]
            )
        except RecipeError as err:
            raise RecipeError(_with_model_hint(str(err), s)) from err
        self.fresh: list[str] = []
        if s["init"]:
            self.fresh = load_init(model, s["init"], allow_missing=head_prefixes(model))
        channels = s["in_chans"] or input_channels(model, size)
        self.channels = channels
        if channels == 3:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            mean, std = estimate_channel_stats(paths=[str(p) for p in self.data["train"][0]], channels=channels)
        train_paths, train_labels = self.data["train"]
        val_paths, val_labels = self.data["val"]
        tf = RandomResizedCropFlip(size, scale=parse_crop_scale(s["crop_scale"]), mean=mean, std=std)
        self.train_ds = ImageFiles(train_paths, tf, channels, train_labels, seed=s["seed"])
        self.train_ds.probe()
        self.val_ds = ImageFiles(val_paths, CenterCrop(size, mean=mean, std=std), channels, val_labels, seed=s["seed"])

        self.cls_names = classifier_names(model)
        if s["linear_probe"]:
            trainable = {n for n, _ in model.named_parameters() if any(n.startswith(c + ".") for c in self.cls_names)}
            for n, p in model.named_parameters():
                p.requires_grad_(n in trainable)
            if not trainable:
                raise RecipeError(f"--linear-probe: cannot find {s['model']}'s classifier")
        if env.distributed and not s["linear_probe"]:
            dist_utils.convert_dense_batchnorm(model, env.device)
        model.to(env.device)
        if s["channels_last"]:
            model.to(memory_format=torch.channels_last)
        self.model = model

        self.sampler = GlobalBatchSampler(len(self.train_ds), s["batch_size"], env.world_size, env.rank, 1, s["seed"])
        workers = s["workers"] if s["workers"] is not None else (0 if env.device.type == "cpu" else 8)
        self.loader = torch.utils.data.DataLoader(
            self.train_ds,
            batch_sampler=self.sampler,
            num_workers=workers,
            collate_fn=collate_images,
            pin_memory=env.device.type == "cuda",
            worker_init_fn=_worker_init if workers > 0 else None,
        )
        val_idx = list(range(env.rank, len(self.val_ds), env.world_size))
        self.val_loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.val_ds, val_idx),
            batch_size=max(1, s["batch_size"] // env.world_size),
            num_workers=workers,
            collate_fn=collate_images,
            pin_memory=env.device.type == "cuda",
            worker_init_fn=_worker_init if workers > 0 else None,
        )

        probe = s["linear_probe"]
        base_lr = s["base_lr"] if s["base_lr"] is not None else (0.1 if probe else 1e-3)
        min_lr = s.get("min_lr")
        min_lr = min_lr if min_lr is not None else (0.01 if probe else 1e-4)
        rule = s.get("lr_rule") or "linear"
        self.peak = s["lr"] if s["lr"] is not None else peak_lr(base_lr, s["batch_size"], rule, min_lr)
        factor = f"sqrt({s['batch_size']}/256)" if rule == "sqrt" else f"{s['batch_size']}/256"
        self.lr_rule = "set by --lr" if s["lr"] is not None else f"max({base_lr:g} x {factor}, {min_lr:g})"
        self.wd = s["weight_decay"] if s["weight_decay"] is not None else (0.0 if probe else 0.05)
        groups = param_groups(model.named_parameters(), self.wd)
        if probe:
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                groups, lr=self.peak, momentum=0.9, weight_decay=self.wd
            )
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=self.peak, weight_decay=self.wd, betas=(0.9, 0.999))
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total = int(s["steps"]) if s["steps"] is not None else s["epochs"] * self.steps_per_epoch
        self.warmup = min(self.total, int(round(s["warmup"] * self.steps_per_epoch)))
        self.save_every = s["save_every"] or self.steps_per_epoch
        self.ddp: nn.Module = model
        if env.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[env.device] if env.device.type == "cuda" else None
            )
        if s["precision"] == "fp16" and env.device.type != "cuda":
            raise RecipeError("--precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[s["precision"]]
        self.scaler = torch.amp.GradScaler("cuda") if s["precision"] == "fp16" else None

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype)

    # ---- checkpoints
    def save_due(self) -> bool:
        """Whether ``--save-minutes`` passed since the last checkpoint (or the start of the loop)."""
        minutes = self.s.get("save_minutes") or 0
        return bool(minutes) and time.monotonic() - self._last_save >= 60.0 * minutes

    def save(self, step: int) -> Path | None:
        self._last_save = time.monotonic()
        rngs = dist_utils.all_gather_objects(ckpt.rng_state())
        bad = sorted(set().union(*dist_utils.all_gather_objects(sorted(self.skipped.paths))))
        path = None
        if self.env.is_main:
            state = {
                "format": FINETUNE_FORMAT,
                "step": step,
                "total_steps": self.total,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": rngs,
                "world_size": self.env.world_size,
                "config": {k: v for k, v in self.s.items() if k != "out"},
                "resolved": {"in_chans": self.channels},
                "best": list(self.best),
                "history": self.history,
                "epoch_loss": self.loss_sum.clone(),
                "skipped_files": bad,
            }
            path = self.folder.save_checkpoint(state, step, self.s["keep"])
        dist_utils.barrier()
        return path

    def restore(self) -> int:
        state = self.state
        assert state is not None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rngs = state.get("rng") or []
        if len(rngs) == self.env.world_size:
            ckpt.set_rng_state(rngs[self.env.rank])
        elif self.env.is_main:
            warn(f"the checkpoint was written by {len(rngs)} process(es), this run has {self.env.world_size}")
        self.best = (float(state["best"][0]), int(state["best"][1]))
        self.history = list(state.get("history") or [])
        self.loss_sum = state["epoch_loss"].to(torch.float64)
        self.skipped = SkipCounter(state.get("skipped_files", []))
        return int(state["step"])

    # ---- the run
    def run(self) -> int:
        s, env = self.s, self.env
        self.build()
        self.skipped = SkipCounter()
        self.best: tuple[float, int] = (-1.0, 0)
        self.history: list[dict[str, float]] = []
        self.loss_sum = torch.zeros(2, dtype=torch.float64)
        start = self.restore() if self.state is not None else 0
        self.header(start)
        logger = (
            RunLogger(
                self.out,
                resume_step=len(self.history) if self.state is not None else None,
                tensorboard=s["tensorboard"],
            )
            if env.is_main
            else None
        )
        if env.is_main:
            self.folder.prepare({k: v for k, v in s.items()})
        if start >= self.total:
            self.say(
                f"this run is already complete ({start}/{self.total} steps); pass a larger --steps or --epochs "
                "to continue it, or a new --out to start another"
            )
            return self.finish(logger)
        mode = "linear probe" if s["linear_probe"] else "fine-tune"
        bar = progress(self.total, start, env.is_main, desc=mode)
        step = start
        it = None
        t0 = time.perf_counter()
        self._last_save = time.monotonic()  # --save-minutes counts from here
        code = EXIT_OK
        bad_streak = 0
        self.buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        with StopRequest(env.is_main) as stop:
            try:
                while step < self.total:
                    epoch, in_epoch = divmod(step, self.steps_per_epoch)
                    if it is None or in_epoch == 0:
                        self.train_ds.set_epoch(epoch)
                        self.sampler.set_epoch(epoch, in_epoch)
                        _set_train_mode(self.model, s["linear_probe"], self.cls_names)
                        it = iter(self.loader)
                    lr = lr_at(step, self.total, self.peak, self.warmup)
                    set_lr_and_wd(self.optimizer, lr, self.wd)
                    loss_value, n, problem = self.train_step(next(it), epoch)
                    step += 1
                    bar.update(1)
                    if problem is None:
                        bad_streak = 0
                        self.loss_sum += torch.tensor([loss_value * n, n], dtype=torch.float64)
                        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
                    else:
                        bad_streak += 1
                        if env.is_main:
                            warn(
                                f"non-finite {problem} at step {step}; skipped this update and restored the BatchNorm "
                                f"statistics ({bad_streak} in a row, stopping at {s['max_bad_steps']})"
                            )
                        if bad_streak >= s["max_bad_steps"]:
                            latest = self.folder.latest()
                            where = (
                                f"the last checkpoint is {latest}: run the same command with a lower --lr (this run's "
                                f"peak is {self.peak:.3g}; e.g. --lr {self.peak / 10:.3g}) to resume from it"
                                if latest
                                else f"no checkpoint was written yet: run the same command with a lower --lr (e.g. "
                                f"--lr {self.peak / 10:.3g}) to start over"
                            )
                            self.say(
                                f"{PROG}: error: the {problem} was not finite for {bad_streak} steps in a row (steps "
                                f"{step + 1 - bad_streak}-{step}); stopping. {where}; or try --precision fp32, "
                                "or check the data.",
                                file=sys.stderr,
                            )
                            code = EXIT_FAILED
                            break
                    # [stop requested, --save-minutes passed] on some rank: every rank decides alike
                    flag = torch.tensor([1.0 if stop.reason else 0.0, float(self.save_due())])
                    dist_utils.all_reduce_sum(flag)
                    stopping = bool(flag[0].item() > 0)
                    if step % self.steps_per_epoch == 0 or step == self.total:
                        self.end_of_epoch(step, lr, time.perf_counter() - t0, logger, bar)
                        t0 = time.perf_counter()
                        _set_train_mode(self.model, s["linear_probe"], self.cls_names)
                    periodic = (
                        step % self.save_every == 0 or step == self.total or flag[1].item() > 0
                    ) and bad_streak == 0
                    if periodic or stopping:
                        self.save(step)
                    if stopping:
                        bar.close()
                        self.say(
                            f"stopped by {stop.reason or 'another process'} at step {step}/{self.total}; checkpoint "
                            f"saved in {self.folder.ckpt_dir}; run the same command again to resume"
                        )
                        code = EXIT_INTERRUPTED
                        break
            finally:
                bar.close()
        if code != EXIT_OK:
            if logger is not None:
                logger.close()
            return code
        return self.finish(logger)

    def train_step(self, batch: Any, epoch: int) -> tuple[float, int, str | None]:
        """One optimiser step on one batch; returns (loss, images, what was not finite or None).

        A step whose loss, gradients or BatchNorm statistics are not finite (on any rank) is skipped: no update,
        and the BatchNorm running statistics its forward changed are restored.
        """
        x, y, bad = batch
        self.skipped.update(bad, report=self.env.is_main)
        x, y = x.to(self.env.device, non_blocking=True), y.to(self.env.device, non_blocking=True)
        if self.s["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        backup = [b.detach().clone() for b in self.buffers]
        with self.autocast():
            logits = self.ddp(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.s["label_smoothing"])
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 5.0)
        buffers_bad = (
            ~torch.isfinite(torch.cat([b.reshape(-1).float() for b in self.buffers])).all()
            if self.buffers
            else torch.zeros((), dtype=torch.bool, device=loss.device)
        )
        # One host read for the decision, summed over ranks so that every rank decides alike. (fp16: the grad
        # scaler itself skips steps with inf/NaN gradients.)
        flags = torch.stack(
            [
                (~torch.isfinite(loss.detach())).double(),
                (~torch.isfinite(norm)).double() * (self.scaler is None),
                buffers_bad.double(),
            ]
        ).cpu()
        dist_utils.all_reduce_sum(flags)
        bad = flags.tolist()
        if any(bad):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:  # unscale_ ran: the scaler must be updated before its next use
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
            with torch.no_grad():
                for b, saved in zip(self.buffers, backup):
                    b.copy_(saved)
            what = "loss" if bad[0] else ("gradients" if bad[1] else "BatchNorm running statistics")
            return float("nan"), int(x.shape[0]), what
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), int(x.shape[0]), None

    def end_of_epoch(self, step: int, lr: float, seconds: float, logger: RunLogger | None, bar: Any) -> None:
        """Evaluate, log, keep the best weights; reset the epoch's running loss."""
        dist_utils.all_reduce_sum(self.loss_sum)
        train_loss = float(self.loss_sum[0] / self.loss_sum[1].clamp_min(1))
        self.loss_sum = torch.zeros(2, dtype=torch.float64)
        classes = len(self.data["classes"])
        metrics = _evaluate(self.model, self.val_loader, self.env, classes, self.autocast, self.s["channels_last"])
        metrics.update(train_loss=train_loss, lr=lr, epoch_time_s=seconds, opt_step=step)
        self.history.append(metrics)
        done = len(self.history)
        top5 = f"  top-5 {metrics['top5']:.2f}%" if "top5" in metrics else ""
        bar.clear()
        self.say(
            f"epoch {done}  train loss {train_loss:.4f}  val loss {metrics['val_loss']:.4f}  "
            f"top-1 {metrics['top1']:.2f}%{top5}"
        )
        if logger is not None:
            logger.log(done, metrics)
        if metrics["top1"] > self.best[0]:
            self.best = (metrics["top1"], done)
            if self.env.is_main:
                _save_weights(self.model, self.out / "best.safetensors")

    def finish(self, logger: RunLogger | None) -> int:
        if self.env.is_main:
            _save_weights(self.model, self.out / "final.safetensors")
            if logger is not None:
                logger.close()
            if self.skipped.count:
                self.say(f"skipped {self.skipped.count} unreadable image file(s)")
            if self.history:
                self.say(
                    f"best top-1 {self.best[0]:.2f}% (epoch {self.best[1]}); "
                    f"final top-1 {self.history[-1]['top1']:.2f}%"
                )
            tb = "tensorboard/, " if self.s["tensorboard"] else ""
            self.say(f"outputs in {self.out}/: metrics.jsonl, {tb}best.safetensors, final.safetensors, checkpoints/")
        return EXIT_OK

    def header(self, start: int) -> None:
        s = self.s
        mode = "linear probe" if s["linear_probe"] else "fine-tune"
        train, val = self.data["train"][0], self.data["val"][0]
        self.say(
            f"{PROG}: {mode} of {s['model']} on {len(self.data['classes'])} classes: {len(train)} training images, "
            f"{len(val)} validation images ({self.data['val_split']}), {format_size(self.size)} px"
        )
        if self.data.get("subset"):
            self.say(f"  training on {self.data['subset']}; files listed in {self.out / 'train_subset.txt'}")
        if s["init"]:
            fresh = ", ".join(self.fresh) if self.fresh else "nothing"
            self.say(f"  initialised from {s['init']}; newly initialised: {fresh}")
        else:
            self.say("  no --init: random initial weights (a from-scratch baseline)")
        epochs = self.total / self.steps_per_epoch
        self.say(
            f"  {self.total} steps (~{epochs:.3g} epochs of {self.steps_per_epoch}), batch {s['batch_size']}, "
            f"peak lr {self.peak:.3g} ({self.lr_rule}), wd {self.wd}, {s['precision']} on {self.env.device}; "
            f"out: {self.out}"
        )
        minutes = f" and every {s['save_minutes']:g} minutes" if s.get("save_minutes") else ""
        self.say(f"  checkpoints every {self.save_every} steps{minutes}, keeping {s['keep'] or 'all'}")
        if start:
            self.say(f"  resuming from {self.resume_from} at step {start}")


def _with_model_hint(message: str, s: dict[str, Any]) -> str:
    """``message``, plus how to proceed when the model that failed to build was named by the --init header."""
    if s["init"] and backbone_header(s["init"]).get("model") == s["model"]:
        return (
            f"{message}. (The model was read from the header of '{s['init']}', written where pretraining ran; "
            "pass --model to say where the factory is now, e.g. --model path/to/file.py:function or "
            "package.module:function)"
        )
    return message


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
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # safetensors writes 0600
    os.replace(tmp, path)
