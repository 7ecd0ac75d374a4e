"""Time a full SparK pretraining step against the dense baseline of the same network.

The dense baseline is the unmodified network (``enc.dense_encoder()``: same parameters, no masking,
no adapters) feeding the very same densify + decoder + loss modules with the same mask, so the ratio
isolates what mask-awareness costs in the encoder. Steps are interleaved (sparse, dense, dense,
sparse, ...) in one process and the median of many steps after warm-up is reported.

    python -m benchmarks.step --model resnet50 --batch 8 --size 128 --device cpu
    python -m benchmarks.step --model convnext_small --batch 128 --size 224 --device cuda \
        --precision bf16 --channels-last --compile --json out.json
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
        for name in ("in_chans", "downsample_ratio", "feature_channels", "feature_strides", "norm_type"):
            setattr(self, name, getattr(enc, name))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        return self.dense(x)


def build_model(name: str, drop_path: float = 0.0) -> nn.Module:
    if name.startswith("torchvision:") or name.startswith("tv:"):
        import torchvision

        return torchvision.models.get_model(name.split(":", 1)[1], weights=None)
    import timm

    kwargs = {"drop_path_rate": drop_path} if drop_path else {}
    return timm.create_model(name.removeprefix("timm:"), pretrained=False, **kwargs)


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    return (int(parts[0]), int(parts[-1]))


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
            "--seed", str(args.seed), "--rss-child", key]
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
    size = _size(args.size)
    model = build_model(args.model).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    enc = sparsify.wrap(model, input_size=size)
    spark = SparK(enc, mask_ratio=args.mask_ratio, decoder_width=args.decoder_width).to(device)
    if args.channels_last:
        spark = spark.to(memory_format=torch.channels_last)
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
        x = x.contiguous(memory_format=torch.channels_last)
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
    return (f"| {r['model']:<18} | {r['batch']:>5} | {r['size'][0]}x{r['size'][1]:<4} | {r['precision']:<4} | "
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
    parser.add_argument("--model", nargs="+", default=["resnet50"], help="timm names or tv:<torchvision name>")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", default="128", help="int or HxW")
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
