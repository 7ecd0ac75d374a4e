"""Measure, as a new user would, how many CNNs wrap and keep the whole contract.

For each model: build it without weights, ``sparsify.wrap`` it, and run every contract check
(``sparsify.testing.run_contract_checks``: zero at masked sites, dense equality against the model's
own outputs, canvas invariance, fully masked samples invisible, sharing, model untouched) in train
and eval mode. Models come from timm and torchvision (none of those the project's tests are tuned on)
and from the hand-written zoo (``tests/zoo``). A refusal counts as a failure unless the model is
expected to be refused (attention hybrids).

    python -m benchmarks.coverage                 # everything, one line per model, then the rate
    python -m benchmarks.coverage --only timm --json coverage.json
    python -m benchmarks.coverage --all --json catalogue.json --markdown catalogue.md
    python -m benchmarks.coverage --all --only swiftformer,s3d,mvit   # name or family prefixes

``--all`` replaces the fixed list by the whole catalogue: one smallest model (fewest parameters,
counted on the meta device) per architecture family of timm (a family is one timm model module, e.g.
``resnet``, ``convnext``, ``efficientnet``) and of torchvision's classification, segmentation and
video models (one per model module). Pure transformers (no convolution beyond a patch-embedding
stem whose kernel equals its stride) are left out; convolution-attention hybrids are kept, to check
that they are refused. Each outcome is one of **pass**, **principled refusal** (attention over
positions, an unpadded first convolution, reflect padding: the reasons the README's Limits give)
or **failure** (any other refusal, a crash, or a broken contract check).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
from pathlib import Path

import torch

import sparsify
from sparsify.testing import run_contract_checks

#: (source, name, input size, constructor kwargs). Sizes are small multiples of each model's R.
REAL_MODELS: list[tuple[str, str, tuple[int, int], dict]] = [
    ("timm", "resnet34d", (64, 96), {}),
    ("timm", "seresnext26d_32x4d", (64, 64), {}),
    ("timm", "ecaresnet26t", (64, 64), {}),
    ("timm", "skresnet18", (64, 64), {}),
    ("timm", "resnest14d", (64, 64), {}),
    ("timm", "regnetx_002", (64, 96), {}),
    ("timm", "rexnet_100", (64, 64), {}),
    ("timm", "ghostnet_100", (64, 64), {}),
    ("timm", "mixnet_s", (64, 64), {}),
    ("timm", "tf_efficientnet_b0", (64, 64), {}),
    ("timm", "mobilenetv2_050", (64, 96), {}),
    ("timm", "dla34", (64, 64), {}),
    ("timm", "nf_resnet26", (64, 64), {}),
    ("timm", "convnextv2_atto", (64, 64), {}),
    ("timm", "lcnet_050", (64, 64), {}),
    ("timm", "ese_vovnet19b_dw", (64, 64), {}),
    ("timm", "gernet_s", (64, 64), {}),
    ("timm", "resnetblur18", (64, 64), {}),
    ("timm", "selecsls42b", (64, 64), {}),
    ("timm", "hrnet_w18_small", (64, 64), {}),
    ("timm", "inception_v3", (160, 160), {}),
    ("torchvision", "googlenet", (64, 64), {"aux_logits": True, "init_weights": True}),
    ("torchvision", "mnasnet0_5", (64, 64), {}),
    ("torchvision", "regnet_x_400mf", (64, 96), {}),
    ("torchvision", "resnext50_32x4d", (64, 64), {}),
    ("torchvision", "squeezenet1_1", (64, 64), {}),
]


#: Refusal texts that name a principled limit (README, Limits): an outcome, not a failure.
PRINCIPLED = {
    "attention": ("attention",),
    "unpadded first convolution": ("never line up", "unpadded"),
    "reflect padding": ("reflect",),
}

#: torchvision model modules searched by --all (classification, segmentation, video).
_TV_GROUPS = ("", "segmentation", "video")


def _is_pure_transformer(model: torch.nn.Module) -> bool:
    """True when no convolution mixes neighbouring sites: at most patch-embedding convolutions
    (kernel == stride) and 1x1 convolutions."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            if any(k > 1 and k != s for k, s in zip(m.kernel_size, m.stride)):
                return False
    return True


def _meta_params(build) -> tuple[int, bool] | None:
    """Parameter count and pure-transformer flag of a model built on the meta device (no memory)."""
    try:
        with torch.device("meta"):
            model = build()
    except Exception:  # noqa: BLE001  (a model that cannot be built on meta is measured for real below)
        return None
    return sum(p.numel() for p in model.parameters()), _is_pure_transformer(model)


def catalogue() -> list[tuple[str, str, tuple[int, ...], dict, str]]:
    """(source, name, size, kwargs, family) for the smallest model of every family, transformers out."""
    import warnings

    import timm
    import torchvision
    from timm.models._registry import _model_to_module

    warnings.filterwarnings("ignore")
    best: dict[tuple[str, str], tuple[int, str, bool]] = {}
    for name in timm.list_models():
        if name.startswith("test_"):  # timm's tiny test configurations are not real architectures
            continue
        family = _model_to_module.get(name, name).rsplit(".", 1)[-1]
        info = _meta_params(lambda name=name: timm.create_model(name, pretrained=False))
        if info is not None and ((("timm", family) not in best) or info[0] < best[("timm", family)][0]):
            best[("timm", family)] = (info[0], name, info[1])
    for group in _TV_GROUPS:
        module = getattr(torchvision.models, group) if group else torchvision.models
        for name in torchvision.models.list_models(module=module):
            fn = torchvision.models.get_model_builder(name)
            family = (group + "/" if group else "") + fn.__module__.rsplit(".", 1)[-1]
            kwargs = {"weights_backbone": None} if group == "segmentation" else {}
            info = _meta_params(lambda name=name, kwargs=kwargs: torchvision.models.get_model(
                name, weights=None, **kwargs))
            if info is not None and (("torchvision", family) not in best or info[0] < best[("torchvision", family)][0]):
                best[("torchvision", family)] = (info[0], name, info[1])
    out = []
    for (source, family), (_, name, pure) in sorted(best.items()):
        if pure:
            continue
        kwargs = {"weights_backbone": None} if family.startswith("segmentation/") else {}
        size = (8, 64, 64) if family.startswith("video/") else (64, 64)
        out.append((source, name, size, kwargs, family))
    return out


def classify(record: dict, attention: bool = False) -> str:
    """pass / principled refusal / failure, from a :func:`check_one` record. A model that attends over
    positions counts as refused on principle only when the refusal names the attention (a hybrid
    refused for its stem's layout names the wrong reason, issue 17 item 10)."""
    if record["ok"]:
        return "pass"
    reason = record["reason"]
    if reason.startswith("refused: "):
        text = reason.lower()
        keys = PRINCIPLED["attention"] if attention else [k for keys in PRINCIPLED.values() for k in keys]
        if any(key in text for key in keys):
            return "principled refusal"
    return "failure"


def _reach(enc: torch.nn.Module) -> dict:
    """Where a passing encoder ends: its last stage's module and stride."""
    last = enc.stages[-1]
    return {"last_stage": f"{last.module or last.name} (stride {last.stride})"}


def _pass_note(record: dict) -> str:
    """The reason column of a pass: empty, except for a model that uses attention. Its pass can only mean
    that the encoder ends before the attention (e.g. XCiT: token blocks after a convolutional patch
    embedding, where the feature maps end), so pretraining would reach only that part."""
    if not record.get("attention"):
        return ""
    return (f"the encoder ends at {record.get('last_stage', 'its last feature map')}, before the attention "
            "blocks, which stay outside it")


def _build(source: str, name: str, kwargs: dict) -> torch.nn.Module:
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)
    import torchvision

    return torchvision.models.get_model(name, weights=None, **kwargs)


def _zoo_models() -> list[tuple[str, str, tuple[int, int], dict]]:
    root = Path(__file__).resolve().parents[1] / "tests"
    sys.path.insert(0, str(root))
    from zoo.models import CASES  # noqa: PLC0415  (the test suite's own zoo)

    return [("zoo", c.name, c.input_size, {"_case": c}) for c in CASES]


def check_one(source: str, name: str, size: tuple[int, int], kwargs: dict) -> dict:
    """Wrap one model and run the whole contract; returns a record with 'ok' and the reason."""
    torch.manual_seed(0)
    start = time.perf_counter()
    record = {"source": source, "model": name, "size": list(size)}
    try:
        if source == "zoo":
            case = kwargs["_case"]
            model, wrap_kwargs = case.build(), dict(case.wrap_kwargs)
        else:
            model, wrap_kwargs = _build(source, name, kwargs), {}
        results, _ = run_contract_checks(model, input_size=size, batch=2, wrap_kwargs=wrap_kwargs,
                                         generator=torch.Generator().manual_seed(0))
        failed = [r for r in results if not r.passed]
        record["ok"] = not failed
        record["reason"] = "; ".join(f"{r.name} [{r.mode}]" for r in failed)
        if record["ok"]:
            record.update(_reach(sparsify.wrap(model, size, **wrap_kwargs)))
    except sparsify.SparsifyError as error:
        record["ok"] = False
        lines = str(error).splitlines()
        record["reason"] = "refused: " + lines[0][:300]
        # The first line names the first operation refused; when attention is named further down
        # (a hybrid whose first refused node is its token reshape), that is the deciding reason too.
        named = next((line.strip() for line in lines[1:] if "attention" in line.lower()), None)
        if named and "attention" not in lines[0].lower():
            record["reason"] += " / " + named[:200]
    except Exception as error:  # noqa: BLE001  (a crash is a result to report, not to hide)
        record["ok"] = False
        record["reason"] = f"crash: {type(error).__name__}: {error}"[:300]
        record["traceback"] = traceback.format_exc(limit=3)
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


_SOURCES = ("timm", "torchvision", "zoo")


def _selected(only: str, source: str, *names: str) -> bool:
    """``--only``: a source (timm, torchvision, zoo) or comma-separated prefixes of a model's name or
    family (e.g. ``resnet`` picks resnet18, resnet50d, ...; ``video/`` every torchvision video family)."""
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    return any(w == source if w in _SOURCES else any(n.startswith(w) for n in names) for w in wanted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None,
                        help="timm, torchvision, zoo, real, or comma-separated prefixes of model or family names "
                             "(e.g. 'resnet,swiftformer,video/')")
    parser.add_argument("--json", type=Path, default=None, help="write every record here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--all", action="store_true",
                        help="the whole catalogue: one smallest model per timm / torchvision family")
    parser.add_argument("--list", action="store_true", help="with --all: print the chosen models and stop")
    parser.add_argument("--markdown", type=Path, default=None, help="with --all: write the table here")
    parser.add_argument("--table", type=Path, default=None,
                        help="re-classify and tabulate the records of an earlier --all --json run (no models run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.all:
        return _run_all(args)
    if args.table:
        return _summarise(json.loads(args.table.read_text()), args.markdown, 0.0)
    models = REAL_MODELS + _zoo_models()
    if args.only == "real":
        models = REAL_MODELS
    elif args.only:
        models = [m for m in models if _selected(args.only, m[0], m[1])]
    records = []
    for source, name, size, kwargs in models:
        record = check_one(source, name, size, kwargs)
        records.append(record)
        status = "ok  " if record["ok"] else "FAIL"
        print(f"{status} {source:11s} {name:22s} {record['seconds']:6.1f}s {record['reason']}", flush=True)
    for group in ("real", "zoo"):
        chosen = [r for r in records if (r["source"] == "zoo") == (group == "zoo")]
        if chosen:
            passed = sum(r["ok"] for r in chosen)
            print(f"{group}: {passed}/{len(chosen)} keep the whole contract ({100 * passed / len(chosen):.0f}%)")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return 0


_SUGGESTION = re.compile(r"use e\.g\. ([\dx]+) or ([\dx]+)")
#: Refusals that say the example input was too small or the wrong size for the network.
_SIZE_TROUBLE = ("not a multiple", "too small", "running the traced graph", "calculated padded", "input height",
                 "input image size", "must match the size", "is invalid for input")


def _default_size(source: str, name: str, rank: int) -> tuple[int, ...]:
    """The model's documented input size: timm's pretrained config; torchvision's weights (the crop
    of their transforms, and for video at least 16 frames or the documented minimum, e.g. s3d's
    224 x 224 and mvit's 16 x 224 x 224, which smaller examples cannot run)."""
    if source == "timm" and rank == 2:
        import timm

        size = timm.create_model(name, pretrained=False).pretrained_cfg.get("input_size", (3, 224, 224))
        return tuple(size[1:])
    if source == "torchvision":
        try:
            import torchvision

            weights = torchvision.models.get_model_weights(name).DEFAULT
            crop = tuple(int(s) for s in getattr(weights.transforms(), "crop_size", (224, 224)))
            frames = max(16, int(weights.meta.get("min_temporal_size", 16)))
        except Exception:  # noqa: BLE001  (no weights entry: the usual sizes below)
            pass
        else:
            if len(crop) == 2 and rank in (2, 3):
                return crop if rank == 2 else (frames, *crop)
    return (224, 224) if rank == 2 else (16, 112, 112)


def _next_size(record: dict, tried: list[tuple[int, ...]], source: str, name: str) -> tuple[int, ...] | None:
    """The next example size to try after a size-related refusal: the size the message suggests, then
    the model's own default input size."""
    reason = record.get("reason", "")
    if not any(key in reason.lower() for key in _SIZE_TROUBLE):
        return None
    found = _SUGGESTION.search(reason)
    if found:
        larger = tuple(int(v) for v in found.group(2).split("x"))
        if len(larger) == len(tried[-1]) and larger not in tried:
            return larger
    default = _default_size(source, name, len(tried[-1]))
    return default if default not in tried else None


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


_PRODUCTS = {"matmul", "__matmul__", "bmm", "baddbmm", "einsum", "scaled_dot_product_attention"}


_TOKEN_WEIGHTS = {"normalize": 1, "softmax": None, "log_softmax": None}  # function -> default dim


def _token_weights(func_name: str, args: tuple, kwargs: dict, positions: set[int]) -> bool:
    """Additive attention (SwiftFormer, Fastformer): weights normalised over the token axis of a
    ``(B, N, k)`` token sequence (N a number of positions at some stride, k <= 16: one weight per
    token or per head), which then pool the tokens
    into a global query that scales every token. A global-context pooling spells its logits
    ``(B, 1, N)`` or ``(B, N)`` and is not matched."""
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        return False
    dim = kwargs.get("dim", args[2] if func_name == "normalize" and len(args) > 2 else
                     args[1] if func_name != "normalize" and len(args) > 1 else _TOKEN_WEIGHTS[func_name])
    if not isinstance(dim, int) or dim % 3 != 1:
        return False
    n, k = x.shape[1], x.shape[2]
    grids = {p for p in positions if p > 1}
    return n in grids and k < n and k <= 16  # one weight per token, or one per head


def uses_attention(source: str, name: str, kwargs: dict, size: tuple[int, ...]) -> bool:
    """True when the model mixes positions by products of two activations that leave a matrix
    (query-key attention maps, linear attention's key-value products, state-space mixing), or by
    additive attention (token weights normalised over the positions, :func:`_token_weights`): found
    by running the unmodified model once and watching matrix products whose operands are both
    activations and normalisations over a token axis. An attention *pooling* (a global-context
    block's weighted sum, a (C, 1) result) does not count; nor do products with weights (linear
    layers)."""
    from torch.overrides import TorchFunctionMode

    found = []
    positions = {_prod(s >> k for s in size) for k in range(7) if all(s >> k for s in size)}

    class _Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            fname = getattr(func, "__name__", "")
            if fname in _TOKEN_WEIGHTS and _token_weights(fname, args, kwargs or {}, positions):
                found.append(f"{fname} over tokens")
            if getattr(func, "__name__", "") in _PRODUCTS:
                operands = [a for a in args if isinstance(a, torch.Tensor)]
                if getattr(func, "__name__", "") == "scaled_dot_product_attention":
                    found.append(func.__name__)
                elif len(operands) >= 2 and not any(isinstance(a, torch.nn.Parameter) for a in operands):
                    if isinstance(out, torch.Tensor) and out.dim() >= 2 and sum(d > 1 for d in out.shape[-2:]) == 2:
                        found.append(func.__name__)
            return out

    try:
        model = _build(source, name, kwargs).eval()
        x = torch.randn(1, 3, *size)
        if len(size) == 3:  # video: positions are frames x rows x columns at any spatial stride
            positions |= {size[0] * n // (2 ** j) for n in positions for j in range(4)}
        with torch.no_grad(), _Watch():
            model(x)
    except Exception:  # noqa: BLE001  (a model that does not run here is judged by its outcome alone)
        return False
    return bool(found)


def _run_all(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    models = catalogue()
    if args.only:
        models = [m for m in models if _selected(args.only, m[0], m[1], m[4])]
    print(f"{len(models)} families ({time.perf_counter() - start:.0f}s to choose them)", flush=True)
    if args.list:
        for source, name, _size, _, family in models:
            print(f"{source:11s} {family:28s} {name}")
        return 0
    records = []
    for source, name, size, kwargs, family in models:
        tried = [size]
        while True:  # a network that needs a larger or different example size gets it
            record = check_one(source, name, tried[-1], kwargs)
            nxt = None if record["ok"] or len(tried) >= 4 else _next_size(record, tried, source, name)
            if nxt is None:
                break
            tried.append(nxt)
        record["attention"] = uses_attention(source, name, kwargs, _default_size(source, name, len(size)))
        record["family"], record["outcome"] = family, classify(record, record["attention"])
        records.append(record)
        print(f"{record['outcome']:19s} {source:11s} {family:26s} {name:26s} {record['seconds']:6.1f}s "
              f"{'attn ' if record['attention'] else ''}{record['reason'][:160]}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(records, indent=1))
    return _summarise(records, args.markdown, time.perf_counter() - start)


def _summarise(records: list[dict], markdown: Path | None, seconds: float) -> int:
    for r in records:
        r["outcome"] = classify(r, r.get("attention", False))
    counts = {k: sum(r["outcome"] == k for r in records) for k in ("pass", "principled refusal", "failure")}
    total = len(records)
    good = counts["pass"] + counts["principled refusal"]
    conv = [r for r in records if not r["attention"]]
    conv_good = sum(r["outcome"] != "failure" for r in conv)
    partial = sum(r["outcome"] == "pass" and bool(_pass_note(r)) for r in records)
    summary = (f"{total} families: {counts['pass']} pass ({partial} of them only up to their attention), "
               f"{counts['principled refusal']} refused on principle, "
               f"{counts['failure']} fail ({100 * good / max(total, 1):.0f}% pass or are refused on principle); "
               f"without attention: {conv_good}/{len(conv)} ({100 * conv_good / max(len(conv), 1):.0f}%); "
               f"{seconds:.0f}s")
    print(summary)
    if markdown:
        lines = ["| source | family | model | attention | input | outcome | reason |", "|---|---|---|---|---|---|---|"]
        for r in records:
            reason = (r["reason"] or (_pass_note(r) if r["outcome"] == "pass" else "")).replace("|", "/")[:200]
            lines.append(f"| {r['source']} | {r['family']} | {r['model']} | {'yes' if r['attention'] else ''} "
                         f"| {'x'.join(map(str, r['size']))} "
                         f"| {r['outcome']} | {reason} |")
        markdown.write_text(summary + "\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
