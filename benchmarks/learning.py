"""Learning-quality benchmark: do SparK-pretrained features beat the same network at random initialisation?

Offline and real: scikit-learn's handwritten digits (1,797 labelled 8x8 scans that ship inside the
package), upsampled to 32x32 grey images. For each seed: build timm resnet18 (one input channel), cut at
``layer2`` (stride 8, so a 32 px image is a 4x4 patch grid SparK can mask), SparK-pretrain it briefly
on the training half (labels unused), then probe the frozen, globally pooled features of

* the same network before pretraining (random initialisation, the same seed), and
* the pretrained network,

with a weighted k-NN classifier (k=20, cosine, as the recipes' monitor) and a logistic regression,
trained on the training half and scored on the held-out half. BatchNorm running statistics are
re-estimated on the training half for both networks, so only the weights differ.

    python -m benchmarks.learning                      # 3 seeds, 300 steps: a few minutes on 2 CPU cores
    python -m benchmarks.learning --seeds 0 1 2 3 4 --steps 600 --json learning.json

``--finetune`` asks the question a user with few labels asks instead: does fine-tuning from the SparK
checkpoint beat training from scratch? Per seed, pretrain once on all training images (labels unused),
then fine-tune the whole network (stem to ``layer2``, global pool, a new linear head) from the
pretrained weights and from the same seed's random initialisation, with the same recipe and budget,
on stratified labelled subsets of the training half (``--label-budgets``, images per class, drawn by
``sparsify-finetune``'s own :func:`label_subset`; 0 = all), and score top-1 on the held-out half.

    python -m benchmarks.learning --finetune --seeds 0 1 2 --label-budgets 5 20 --threads 1

Needs scikit-learn (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from sparsify.recipes.finetune import label_subset
from sparsify.recipes.knn import knn_top1
from sparsify.recipes.optim import create_optimizer, param_groups, set_lr_and_wd
from sparsify.recipes.schedules import lr_at, wd_at

import sparsify


def _digits(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels): a stratified half split, normalised."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    tr, te = train_test_split(range(len(y)), test_size=0.5, stratify=y.numpy(), random_state=0)
    return x[tr], y[tr], x[te], y[te]


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 3 px (zero padded): digits must not be flipped."""
    pad = 3
    padded = F.pad(x, (pad, pad, pad, pad))
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * pad + 1, (x.shape[0], 2), generator=g)
    h, w = x.shape[-2:]
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


def _build(seed: int, size: int, decoder_width: int) -> sparsify.SparK:
    return _build_with_model(seed, size, decoder_width)[0]


def _build_with_model(seed: int, size: int, decoder_width: int) -> tuple[sparsify.SparK, torch.nn.Module]:
    """SparK around timm resnet18 (one channel) cut at layer2, and the model itself (it shares the weights)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=0)
    enc = sparsify.wrap(model, input_size=(size, size), stages=["layer1_1_act2", "layer2_1_act2"])
    return sparsify.SparK(enc, mask_ratio=0.6, decoder_width=decoder_width), model


@torch.no_grad()
def _features(spark: sparsify.SparK, train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled coarsest features (mask=None) after re-estimating BatchNorm statistics on ``train``."""
    enc = spark.encoder
    norms = [m for m in enc.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    enc.train()
    for lo in range(0, len(train), 256):
        enc(train[lo : lo + 256])
    enc.eval()
    out = []
    for data in (train, test):
        out.append(torch.cat([enc(data[lo : lo + 256])[-1].mean(dim=(2, 3)) for lo in range(0, len(data), 256)]))
    for m, (momentum, mean, var) in zip(norms, saved):
        m.momentum = momentum
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
    return out[0], out[1]


def _probe(
    train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor
) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    knn = knn_top1(train_f, train_y, test_f, test_y, k=20)
    scaler = StandardScaler().fit(train_f.numpy())
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(train_f.numpy()), train_y.numpy())
    logreg = float(clf.score(scaler.transform(test_f.numpy()), test_y.numpy()))
    return {"knn": knn, "logreg": logreg}


def run_seed(seed: int, args: argparse.Namespace, data: tuple[torch.Tensor, ...]) -> dict:
    """Pretrain one seed; probe before and after."""
    x_tr, y_tr, x_te, y_te = data
    spark = _build(seed, args.size, args.decoder_width)
    before = _probe(*_pair(_features(spark, x_tr, x_te), y_tr, y_te))
    values, seconds = _pretrain(spark, x_tr, seed, args)
    after = _probe(*_pair(_features(spark, x_tr, x_te), y_tr, y_te))
    head, tail = values[: min(20, len(values))], values[-min(20, len(values)) :]
    return {
        "seed": seed,
        "random_init": before,
        "pretrained": after,
        "loss_first20": sum(head) / len(head),
        "loss_last20": sum(tail) / len(tail),
        "pretrain_seconds": seconds,
    }


def _pretrain(spark: sparsify.SparK, x_tr: torch.Tensor, seed: int, args: argparse.Namespace) -> tuple[list, float]:
    """SparK-pretrain in place on ``x_tr`` (labels unused); returns (losses, seconds)."""
    groups = param_groups(spark.named_parameters(), 0.04)
    opt = create_optimizer(groups, lr=args.lr, weight_decay=0.04, norm_type=spark.encoder.norm_type, opt="lamb")
    g = torch.Generator().manual_seed(seed + 17)
    spark.train()
    losses = []
    t0 = time.perf_counter()
    warmup = max(1, args.steps // 10)
    for step in range(args.steps):
        set_lr_and_wd(opt, lr_at(step, args.steps, args.lr, warmup), wd_at(step, args.steps))
        idx = torch.randint(0, len(x_tr), (args.batch,), generator=g)
        loss = spark(_augment(x_tr[idx], g), generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(spark.parameters(), 5.0)
        opt.step()
        losses.append(loss.detach())
    seconds = time.perf_counter() - t0
    return torch.stack(losses).tolist(), seconds  # one host read for the whole run


def _classifier(model: torch.nn.Module, classes: int, seed: int) -> torch.nn.Module:
    """The network SparK trained (resnet18's stem to layer2), a global average pool and a new linear head."""
    torch.manual_seed(seed + 99)  # the same head for both arms
    parts = [model.conv1, model.bn1, model.act1, model.maxpool, model.layer1, model.layer2]
    head = torch.nn.Linear(model.layer2[-1].conv2.out_channels, classes)
    return torch.nn.Sequential(*parts, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), head)


def _finetune(
    net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor, seed: int,
    args: argparse.Namespace,
) -> float:  # fmt: skip
    """Fine-tune every layer with sparsify-finetune's recipe (AdamW, wd 0.05 except 1-D params, label smoothing
    0.1, warm-up then cosine, grad clip 5) for ``args.ft_steps`` steps; returns top-1 on the test images."""
    groups = param_groups(net.named_parameters(), 0.05)
    opt = torch.optim.AdamW(groups, lr=args.ft_lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed + 31)
    warmup = max(1, args.ft_steps // 10)
    net.train()
    for step in range(args.ft_steps):
        set_lr_and_wd(opt, lr_at(step, args.ft_steps, args.ft_lr, warmup), 0.05)
        idx = torch.randint(0, len(x), (min(args.ft_batch, len(x)),), generator=g)
        loss = F.cross_entropy(net(_augment(x[idx], g)), y[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(x_te[lo : lo + 512]).argmax(1) for lo in range(0, len(x_te), 512)])
    return float((pred == y_te).float().mean())


def run_finetune_seed(seed: int, args: argparse.Namespace, data: tuple[torch.Tensor, ...]) -> dict:
    """Pretrain once; fine-tune pretrained and random-init copies at every label budget."""
    import copy

    x_tr, y_tr, x_te, y_te = data
    spark, model = _build_with_model(seed, args.size, args.decoder_width)
    random_init = copy.deepcopy(model)  # the same seed's initial weights, before pretraining
    values, seconds = _pretrain(spark, x_tr, seed, args)
    head, tail = values[:20], values[-20:]
    row: dict = {"seed": seed, "loss_first20": sum(head) / len(head), "loss_last20": sum(tail) / len(tail)}
    row.update(pretrain_seconds=seconds, budgets={})
    classes = int(y_tr.max()) + 1
    for budget in args.label_budgets:
        keep = list(range(len(y_tr))) if budget == 0 else label_subset(y_tr.tolist(), per_class=budget, seed=seed)
        x, y = x_tr[keep], y_tr[keep]
        t0 = time.perf_counter()
        arms = {}
        for arm, source in (("random_init", random_init), ("pretrained", model)):
            net = _classifier(copy.deepcopy(source), classes, seed)
            arms[arm] = _finetune(net, x, y, x_te, y_te, seed, args)
        arms["images"] = len(keep)
        arms["seconds"] = time.perf_counter() - t0
        row["budgets"][str(budget)] = arms
        print(
            f"seed {seed}, {budget or 'all'} labels per class ({len(keep)} images): "
            f"scratch {100 * arms['random_init']:.1f}%, pretrained {100 * arms['pretrained']:.1f}% "
            f"({arms['seconds']:.0f} s)",
            flush=True,
        )
    return row


def _finetune_report(rows: list[dict], args: argparse.Namespace) -> dict:
    table = {}
    print("\n| labels per class | from scratch top-1 % | SparK-pretrained top-1 % | gain, paired by seed (points) |")
    print("|---|---|---|---|")
    for budget in args.label_budgets:
        key = str(budget)
        scratch = [r["budgets"][key]["random_init"] for r in rows]
        pre = [r["budgets"][key]["pretrained"] for r in rows]
        gain = [b - a for a, b in zip(scratch, pre)]
        table[key] = {"scratch": _mean_std(scratch), "pretrained": _mean_std(pre), "gain": _mean_std(gain)}
        images = rows[0]["budgets"][key]["images"]
        label = f"{budget} ({images} images)" if budget else f"all ({images} images)"
        print(f"| {label} | {table[key]['scratch']} | {table[key]['pretrained']} | {table[key]['gain']} |")
    return table


def _pair(feats: tuple[torch.Tensor, torch.Tensor], y_tr: torch.Tensor, y_te: torch.Tensor):
    return feats[0], y_tr, feats[1], y_te


def _mean_std(values: list[float]) -> str:
    m = statistics.mean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300, help="pretraining steps per seed")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="peak LAMB learning rate")
    p.add_argument("--size", type=int, default=32, help="image size (a multiple of 8)")
    p.add_argument("--decoder-width", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--limit", type=int, default=None, help="use at most N images of each half (smoke tests)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--finetune", action="store_true", help="low-label fine-tuning instead of frozen-feature probes")
    p.add_argument("--label-budgets", type=int, nargs="+", default=[5, 20, 0], help="labels per class (0 = all)")
    p.add_argument("--ft-steps", type=int, default=150, help="fine-tuning steps per arm and budget")
    p.add_argument("--ft-batch", type=int, default=32)
    p.add_argument("--ft-lr", type=float, default=1e-3, help="peak AdamW learning rate of fine-tuning")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if math.gcd(args.size, 8) != 8:
        p.error("--size must be a multiple of 8")
    data = _digits(args.size)
    if args.limit:
        data = tuple(t[: args.limit] for t in data)
    rows = []
    t0 = time.perf_counter()
    if args.finetune:
        rows = [run_finetune_seed(seed, args, data) for seed in args.seeds]
        result = {
            "config": vars(args),
            "rows": rows,
            "table": _finetune_report(rows, args),
            "total_seconds": time.perf_counter() - t0,
            "torch": torch.__version__,
            "machine": platform.platform(),
            "threads": torch.get_num_threads(),
            "load_average": list(__import__("os").getloadavg()),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        print(f"total {result['total_seconds']:.0f} s on {result['threads']} threads")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
        return result
    for seed in args.seeds:
        row = run_seed(seed, args, data)
        rows.append(row)
        print(
            f"seed {seed}: loss {row['loss_first20']:.3f} -> {row['loss_last20']:.3f} "
            f"in {row['pretrain_seconds']:.0f} s; "
            f"k-NN {100 * row['random_init']['knn']:.1f} -> {100 * row['pretrained']['knn']:.1f}, "
            f"logreg {100 * row['random_init']['logreg']:.1f} -> {100 * row['pretrained']['logreg']:.1f}",
            flush=True,
        )
    summary = {
        kind: {probe: _mean_std([r[kind][probe] for r in rows]) for probe in ("knn", "logreg")}
        for kind in ("random_init", "pretrained")
    }
    gains = {
        probe: _mean_std([r["pretrained"][probe] - r["random_init"][probe] for r in rows])
        for probe in ("knn", "logreg")
    }
    print("\n| features (resnet18 to layer2, 32 px digits) | k-NN top-1 % | logistic regression top-1 % |")
    print("|---|---|---|")
    print(f"| random initialisation | {summary['random_init']['knn']} | {summary['random_init']['logreg']} |")
    after = summary["pretrained"]
    print(f"| SparK-pretrained, {args.steps} steps | {after['knn']} | {after['logreg']} |")
    print(f"| gain (paired by seed) | {gains['knn']} | {gains['logreg']} |")
    result = {
        "config": vars(args),
        "rows": rows,
        "summary": summary,
        "gain": gains,
        "total_seconds": time.perf_counter() - t0,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print(f"total {result['total_seconds']:.0f} s on {result['threads']} threads")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
