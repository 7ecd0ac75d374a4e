"""Time a full SparK pretraining step against the dense baseline of the same network.

The dense baseline is the unmodified network (``enc.dense_encoder()``: same parameters, no masking,
no adapters) feeding the very same densify + decoder + loss modules with the same mask, so the ratio
isolates what mask-awareness costs in the encoder. Steps are interleaved (sparse, dense, dense,
sparse, ...) in one process and the median of many steps after warm-up is reported.

    python -m benchmarks.step --model resnet50 --batch 8 --size 128 --device cpu
    python -m benchmarks.step --model convnext_small --batch 128 --size 224 --device cuda \
        --precision bf16 --channels-last --compile --json out.json
    python -m benchmarks.step --model tv:r3d_18 dna:resenc --batch 2 --size 16x64x64 --threads 1
    python -m benchmarks.step --model monai:resnet10 --batch 2 --size 64x64x64 --in-chans 1

Volumes: ``--size DxHxW`` (``--size LEN --spatial-dims 1`` for signals). Besides timm and torchvision
(``tv:r3d_18``, ``tv:r2plus1d_18``), ``monai:<name>`` builds a MONAI network with ``spatial_dims=3``
(``monai:resnet10`` ... ``monai:resnet50``, ``monai:densenet121``) and ``dna:resenc`` /
``dna:plainconv`` nnU-Net's residual / plain encoder (InstanceNorm3d, strides
[[1,1,1],[1,2,2],[2,2,2],[2,2,2],[1,2,2]], 32..320 channels, returning every stage).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
from torch import nn

import sparsify
from sparsify.spark import SparK


class _DenseAsEncoder(nn.Module):
    """The dense network behind the encoder's interface (ignores the mask)."""

    def __init__(self, enc: sparsify.SparseEncoder):
        super().__init__()
        self.dense = enc.dense_encoder()
        for name in ("in_chans", "downsample_ratio", "feature_channels", "feature_strides", "norm_type",
                     "spatial_dims", "patch_size"):
            if hasattr(enc, name):
                setattr(self, name, getattr(enc, name))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        return self.dense(x)


#: nnU-Net's 3d_fullres plan for thick slices: no stride in depth at the first and last downsampling.
NNUNET_STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]


def _dna_encoder(name: str, in_chans: int) -> nn.Module:
    """nnU-Net's ResEnc-M (or plain conv) encoder for a 5-stage plan, every stage returned."""
    from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
    from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder

    common = dict(input_channels=in_chans, n_stages=5, features_per_stage=[32, 64, 128, 256, 320],
                  conv_op=nn.Conv3d, kernel_sizes=3, strides=NNUNET_STRIDES, conv_bias=True,
                  norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                  nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, return_skips=True)
    if name == "resenc":
        return ResidualEncoder(n_blocks_per_stage=[1, 3, 4, 6, 6], **common)
    if name == "plainconv":
        return PlainConvEncoder(n_conv_per_stage=2, **common)
    raise ValueError(f"unknown dna: model {name!r}; use dna:resenc or dna:plainconv")


def build_model(name: str, drop_path: float = 0.0, in_chans: int | None = None) -> nn.Module:
    if name.startswith("dna:"):
        return _dna_encoder(name.split(":", 1)[1], in_chans or 1)
    if name.startswith("monai:"):
        from monai.networks import nets

        arch = name.split(":", 1)[1]
        if arch.startswith("resnet"):
            return getattr(nets, arch)(spatial_dims=3, n_input_channels=in_chans or 1, num_classes=2)
        return getattr(nets, arch)(spatial_dims=3, in_channels=in_chans or 1, out_channels=2)
    if name.startswith("torchvision:") or name.startswith("tv:"):
        import torchvision

        return torchvision.models.get_model(name.split(":", 1)[1], weights=None)
    import timm

    kwargs = {"drop_path_rate": drop_path} if drop_path else {}
    return timm.create_model(name.removeprefix("timm:"), pretrained=False, **kwargs)


def _size(text: str, spatial_dims: int | None = None) -> tuple[int, ...]:
    """``"128"`` -> (128, 128); ``"16x64x64"`` -> (16, 64, 64); ``"512"`` with spatial_dims=1 -> (512,)."""
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) == 1:
        return tuple(parts * (spatial_dims or 2))
    if spatial_dims and len(parts) != spatial_dims:
        raise SystemExit(f"--size {text} has {len(parts)} sides but --spatial-dims is {spatial_dims}")
    return tuple(parts)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _saved_bytes(step, x, mask, exclude: set[int]) -> int:
    """Bytes of the tensors autograd saves for backward during one step (unique storages, parameters
    and buffers excluded): the activation memory a training step holds at its peak, independent of
    the allocator and of machine load."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(x, mask)
    return sum(seen.values())


def _peak_rss_mib(args: argparse.Namespace, key: str) -> float:
    """Peak resident memory (VmHWM) of a fresh process that builds the model and runs ``key``'s
    steps alone: what the step costs the machine, allocator and all (CPU only)."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "benchmarks.step", "--model", args.model, "--batch", str(args.batch),
            "--size", args.size, "--device", args.device, "--precision", args.precision, "--steps", "2",
            "--warmup", "1", "--mask-ratio", str(args.mask_ratio), "--decoder-width", str(args.decoder_width),
            "--seed", str(args.seed), "--loss", args.loss, "--rss-child", key]
    for flag in ("spatial_dims", "in_chans", "patch_size"):
        if getattr(args, flag):
            argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    for flag in ("channels_last", "encoder_only"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    if args.threads:
        argv += ["--threads", str(args.threads)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    size = _size(args.size, args.spatial_dims)
    model = build_model(args.model, in_chans=args.in_chans).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last if len(size) == 2 else torch.channels_last_3d)
    wrap_kwargs = {"in_chans": args.in_chans} if args.in_chans else {}
    if args.patch_size:
        wrap_kwargs["patch_size"] = _size(args.patch_size, len(size))
    enc = sparsify.wrap(model, input_size=size, **wrap_kwargs)
    spark_kwargs = {"loss": args.loss} if args.loss != "spark" else {}
    spark = SparK(enc, mask_ratio=args.mask_ratio, decoder_width=args.decoder_width, **spark_kwargs).to(device)
    layout = torch.channels_last if len(size) == 2 else torch.channels_last_3d
    if args.channels_last:
        spark = spark.to(memory_format=layout)
    dense_spark = copy.copy(spark)
    dense_spark._modules = dict(spark._modules)
    dense_spark._modules["encoder"] = _DenseAsEncoder(enc)
    spark.train()
    dense_spark.train()

    opt = torch.optim.AdamW(spark.parameters(), lr=1e-4)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    x = torch.randn(args.batch, enc.in_chans, *size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=layout)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    masks = [spark.draw_mask(x, gen) for _ in range(4)]

    def encoder_loss(module):  # --encoder-only: the encoder alone, a stand-in loss on its features
        def loss(x, mask):
            return sum(f.float().square().mean() for f in module.encoder(x, mask))

        return loss

    def step_fn(module):
        # As the recipe does: its masks are known to mask something, so no host read checks them.
        forward = encoder_loss(module) if args.encoder_only else functools.partial(module, check_mask=False)

        def step(x, mask):
            with autocast():
                loss = forward(x, mask)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step

    steps = {"sparse": step_fn(spark), "dense": step_fn(dense_spark)}
    eager_steps = dict(steps)  # saved-tensor accounting runs eagerly (hooks would disturb compiled graphs)
    if args.compile:
        for key in steps:
            fwd = torch.compile(spark if key == "sparse" else dense_spark, fullgraph=True)
            steps[key] = step_fn(fwd)

    if args.rss_child:  # one variant alone, for _peak_rss_mib: report this process's peak RSS
        for i in range(args.warmup + args.steps):
            steps[args.rss_child](x, masks[i % len(masks)])
        print(f"{_vm_hwm_mib():.1f}")
        return {}

    times: dict[str, list[float]] = {"sparse": [], "dense": []}
    memory: dict[str, int | None] = {"sparse": None, "dense": None}
    params = {t.untyped_storage().data_ptr() for m in (spark, dense_spark) for t in
              (*m.parameters(), *m.buffers())}
    saved = {key: _saved_bytes(eager_steps[key], x, masks[0], params) for key in ("sparse", "dense")}
    rss = {key: _peak_rss_mib(args, key) for key in ("sparse", "dense")} if args.rss else None
    sync_debug = args.sync_debug and device.type == "cuda"
    first: dict[str, float] = {}
    for key in ("sparse", "dense"):  # warm-up (and compilation), then peak memory of one step
        start = time.perf_counter()
        for i in range(args.warmup):
            steps[key](x, masks[i % len(masks)])
            _sync(device)
            if i == 0:
                first[key] = time.perf_counter() - start  # with --compile: compilation included
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            steps[key](x, masks[0])
            _sync(device)
            memory[key] = torch.cuda.max_memory_allocated(device)
    for i in range(args.steps):
        order = ("sparse", "dense") if i % 2 == 0 else ("dense", "sparse")
        for key in order:
            mask = masks[i % len(masks)]
            _sync(device)
            if sync_debug and key == "sparse":
                torch.cuda.set_sync_debug_mode("error")
            start = time.perf_counter()
            steps[key](x, mask)
            if sync_debug and key == "sparse":
                torch.cuda.set_sync_debug_mode("default")
            _sync(device)
            times[key].append(time.perf_counter() - start)
    result = {
        "model": args.model, "batch": args.batch, "size": list(size), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "threads": torch.get_num_threads(), "precision": args.precision, "channels_last": args.channels_last,
        "compile": args.compile, "encoder_only": args.encoder_only,
        "steps": args.steps, "warmup": args.warmup, "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    for key in ("sparse", "dense"):
        median = statistics.median(times[key])
        result[key] = {"step_s": median, "images_per_s": args.batch / median,
                       "peak_memory_mib": None if memory[key] is None else memory[key] / 2**20}
        result[key]["first_step_s"] = first.get(key)
        result[key]["all_step_s"] = times[key]  # in timing order: shows the spread a median hides
        result[key]["saved_for_backward_mib"] = saved[key] / 2**20
        result[key]["peak_rss_mib"] = rss[key] if rss else None
    result["ratio"] = result["sparse"]["step_s"] / result["dense"]["step_s"]
    result["saved_ratio"] = saved["sparse"] / saved["dense"]
    if rss:
        result["rss_ratio"] = rss["sparse"] / rss["dense"]
    if memory["sparse"] and memory["dense"]:
        result["memory_ratio"] = memory["sparse"] / memory["dense"]
    return result


def format_row(r: dict) -> str:
    mem = r["sparse"]["peak_memory_mib"]
    if mem:
        mem_text = f"{mem:8.0f} / {r['dense']['peak_memory_mib']:8.0f}"
    elif r["sparse"].get("peak_rss_mib"):
        mem_text = f"RSS {r['sparse']['peak_rss_mib']:6.0f} / {r['dense']['peak_rss_mib']:6.0f}"
    else:
        mem_text = "       n/a"
    saved = f"{r['sparse']['saved_for_backward_mib']:6.0f} / {r['dense']['saved_for_backward_mib']:6.0f}"
    size = "x".join(str(s) for s in r["size"])
    return (f"| {r['model']:<18} | {r['batch']:>5} | {size:<8} | {r['precision']:<4} | "
            f"{'cl' if r['channels_last'] else '  '} {'compiled' if r['compile'] else 'eager   '}"
            f"{' enc' if r.get('encoder_only') else ''} | "
            f"{r['sparse']['step_s'] * 1e3:9.1f} | {r['dense']['step_s'] * 1e3:9.1f} | "
            f"{r['sparse']['images_per_s']:8.1f} | {r['dense']['images_per_s']:8.1f} | {mem_text} | "
            f"{saved} | {r['ratio']:5.3f} |")


HEADER = ("| model              | batch | size     | prec | layout/mode | sparse ms | dense ms  | sparse/s | "
          "dense/s  | peak MiB sparse / dense | saved MiB sparse / dense | ratio |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["resnet50"],
                        help="timm names, tv:<torchvision name>, monai:<MONAI name> (3-D), dna:resenc / dna:plainconv")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", default="128", help="int, HxW, DxHxW (volumes) or LEN with --spatial-dims 1")
    parser.add_argument("--spatial-dims", type=int, choices=[1, 2, 3], default=None,
                        help="rank of a single-int --size (default 2)")
    parser.add_argument("--in-chans", type=int, default=None, help="input channels (default: the model's)")
    parser.add_argument("--patch-size", default=None, help="mask patch finer than the ratio (int or DxHxW)")
    parser.add_argument("--loss", choices=["spark", "mse"], default="spark")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--decoder-width", type=int, default=768)
    parser.add_argument("--encoder-only", action="store_true",
                        help="time the encoder alone (forward, backward, optimiser) instead of the SparK step")
    parser.add_argument("--sync-debug", action="store_true",
                        help="CUDA: torch.cuda.set_sync_debug_mode('error') around every sparse step")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss", action="store_true",
                        help="CPU: also measure each variant's peak RSS in a fresh process (slower)")
    parser.add_argument("--rss-child", choices=["sparse", "dense"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        run(argparse.Namespace(**{**vars(args), "model": args.model[0]}))
        return
    results = []
    print(HEADER, flush=True)
    for name in args.model:
        one = argparse.Namespace(**{**vars(args), "model": name})
        r = run(one)
        results.append(r)
        print(format_row(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
