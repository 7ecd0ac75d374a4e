"""Measure, as a new user would, how many CNNs wrap and keep the whole contract.

For each model: build it without weights, ``sparsify.wrap`` it, and run every contract check
(``sparsify.testing.run_contract_checks``: zero at masked sites, dense equality against the model's
own outputs, canvas invariance, fully masked samples invisible, sharing, model untouched) in train
and eval mode. Models come from timm and torchvision (none of those the project's tests are tuned on)
and from the hand-written zoo (``tests/zoo``). A refusal counts as a failure unless the model is
expected to be refused (attention hybrids).

    python -m benchmarks.coverage                 # everything, one line per model, then the rate
    python -m benchmarks.coverage --only timm --json coverage.json
"""

from __future__ import annotations

import argparse
import json
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
    except sparsify.SparsifyError as error:
        record["ok"] = False
        record["reason"] = "refused: " + str(error).splitlines()[0][:300]
    except Exception as error:  # noqa: BLE001  (a crash is a result to report, not to hide)
        record["ok"] = False
        record["reason"] = f"crash: {type(error).__name__}: {error}"[:300]
        record["traceback"] = traceback.format_exc(limit=3)
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["timm", "torchvision", "zoo", "real"], default=None)
    parser.add_argument("--json", type=Path, default=None, help="write every record here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = REAL_MODELS + _zoo_models()
    if args.only == "real":
        models = REAL_MODELS
    elif args.only:
        models = [m for m in models if m[0] == args.only]
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


if __name__ == "__main__":
    raise SystemExit(main())
