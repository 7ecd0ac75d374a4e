"""``sparsify-pretrain``: SparK masked pretraining of any CNN on a folder of images.

Run with no arguments, it is a quick demonstration: a small CNN pretrained on CPU on photographs
bundled with scikit-image. With ``--data DIR`` the defaults are the SparK paper's ImageNet recipe
(design.md section 7: ResNet-50, 224 px, 1600 epochs, LAMB, 40 warm-up epochs, weight decay cosine
0.04 -> 0.2, mask ratio 0.6) at the batch one machine holds (the largest micro-batch per device, no
accumulation) with the peak lr max(8e-4 x sqrt(batch/256), 1e-3); ``--preset paper`` is the recipe
exactly (global batch 4096 by accumulation, lr 2e-4 x batch/256). Every flag overrides.

Volumes: a ``--data`` folder of scans (NIfTI, NumPy, DICOM series; :mod:`.volumes`) is detected and trained
in 3-D with the ``scans`` preset (64^3 crops); ``--volumes`` alone is the offline default (a small 3-D
ResNet on synthetic phantoms). :mod:`.scan_run` fits volumes into the same run.

Outputs go to ``runs/<name>/`` (or ``--out``): ``checkpoints/`` (full state, atomic, auto-resumed),
``backbone.safetensors`` (the pretrained model's weights, original names, head removed),
``metrics.jsonl``, ``tensorboard/``, ``recon_start.png`` / ``recon_end.png`` / ``recon_latest.png``
(labelled columns) and ``loss_curve.png``. ``--knn-data DIR`` adds a k-NN accuracy monitor (:mod:`.knn`).

Multi-GPU / multi-node: ``torchrun --nproc-per-node 8 -m sparsify.recipes.pretrain --data DIR ...``
(``--batch-size`` is the global batch).

The program is split by concept: :mod:`.config` (presets, flags, resolved settings), :mod:`.run_folder`
(folder, resume choice, checkpoints), :mod:`.train_loop` (the loop) and :mod:`.report` (console lines,
pictures, outputs); this module only ties them together.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cli import EXIT_INTERRUPTED, EXIT_OK, quiet_known_warnings, run_main
from .config import (
    COMMON_DEFAULTS,
    PRESETS,
    PROG,
    SHAPE_KEYS,
    PretrainConfig,
    build_parser,
    default_out,
    explicit_settings,
    resolve_config,
)
from .resume import check_resume

# Settings a resumed run may change, with a notice (the shape-fixing ones, SHAPE_KEYS, it may not).
NOTICE_KEYS = ("batch_size", "mask_ratio", "seed", "accum", "crop_scale", "intensity")

__all__ = ["PRESETS", "COMMON_DEFAULTS", "PretrainConfig", "build_parser", "resolve_config", "main"]


def __getattr__(name: str) -> object:
    # The training loop imports torch; load it only when a run starts (or a caller asks for it).
    if name == "Pretrainer":
        from .train_loop import Pretrainer

        return Pretrainer
    raise AttributeError(name)


def _pretrain(argv: Sequence[str] | None) -> int:
    quiet_known_warnings()
    args = build_parser().parse_args(argv)
    explicit = explicit_settings(args)
    # Check the flags on their own first, before torch is imported: argument errors stay instant.
    resolve_config({**explicit, "out": explicit.get("out") or "."})
    out = Path(explicit.get("out") or default_out(explicit))
    from .run_folder import RunFolder  # imports torch: only once the arguments are known to be good

    folder = RunFolder(out)
    main_process = os.environ.get("RANK", "0") == "0"  # torchrun's rank, before the process group exists
    if main_process:
        folder.check_writable()  # before the model is built: fail in a second, not after minutes
        folder.lock()  # one live run per folder (released when this process ends, however it ends)
    code = None
    try:
        code = _locked_pretrain(args, explicit, folder, main_process)
        return code
    finally:  # a run that failed before its first step leaves no folder behind
        folder.close(failed=code != EXIT_OK, say=lambda line: print(f"{PROG}: {line}", file=sys.stderr, flush=True))


def _locked_pretrain(args: Any, explicit: dict[str, Any], folder: Any, main_process: bool) -> int:
    from . import checkpoint as ckpt
    from . import distributed as dist_utils
    from .train_loop import Pretrainer

    resume_path = folder.find_resume(str(args.resume))
    saved_state: dict | None = None
    saved_cfg: dict | None = None
    if resume_path is not None:
        saved_state, resume_path = ckpt.load_checkpoint(resume_path)
        saved_cfg = dict(saved_state.get("config") or {})
        saved_cfg.pop("out", None)
        notices = check_resume(
            folder.out, explicit, saved_cfg, saved_state.get("resolved") or {}, SHAPE_KEYS, NOTICE_KEYS
        )
        for line in notices if main_process else []:
            print(line, flush=True)
    explicit["out"] = str(folder.out)
    cfg = resolve_config(explicit, saved_cfg)
    finished = False  # every rank got to the end: they can meet once more before tearing down
    env = dist_utils.setup(cfg.device, timeout_minutes=cfg.dist_timeout)
    try:
        trainer = Pretrainer(cfg, env, resume_path, saved_state)
        code = trainer.run(explicit)
        finished = True
        return code
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        dist_utils.cleanup(finished)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sparsify-pretrain`` (or ``python -m sparsify.recipes.pretrain``): the exit code."""
    return run_main(PROG, lambda: _pretrain(argv))


if __name__ == "__main__":
    sys.exit(main())
