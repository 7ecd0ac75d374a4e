"""``sparsify-pretrain``: SparK masked pretraining of any CNN on a folder of images.

Run with no arguments, it is a quick demonstration: a small CNN pretrained for a few minutes on CPU on
photographs bundled with scikit-image. With ``--data DIR`` the defaults are the SparK paper's ImageNet
recipe (design.md section 7): ResNet-50, 224 px, batch 4096, 1600 epochs, LAMB, base lr 2e-4 x
batch/256, 40 warm-up epochs, weight decay cosine 0.04 -> 0.2, mask ratio 0.6. Every flag overrides.

Outputs go to ``runs/<name>/`` (or ``--out``): ``checkpoints/`` (full state, atomic, auto-resumed),
``backbone.safetensors`` (the pretrained model's weights, original names, head removed),
``metrics.jsonl``, ``tensorboard/``, ``recon_start.png`` / ``recon_end.png`` and ``loss_curve.png``.

Multi-GPU / multi-node: ``torchrun --nproc-per-node 8 -m sparsify.recipes.pretrain --data DIR ...``
(``--batch-size`` is the global batch).

The program is split by concept: :mod:`.config` (presets, flags, resolved settings), :mod:`.run_folder`
(folder, resume choice, checkpoints), :mod:`.train_loop` (the loop) and :mod:`.report` (console lines,
pictures, outputs); this module only ties them together.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from .cli import EXIT_INTERRUPTED, RecipeError, parse_size, quiet_known_warnings, run_main
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
    from .run_folder import RunFolder  # imports torch: only after the arguments parsed (fast --help)

    resume_path = RunFolder(out).find_resume(str(args.resume))
    from . import checkpoint as ckpt
    from . import distributed as dist_utils
    from .train_loop import Pretrainer

    saved_state: dict | None = None
    saved_cfg: dict | None = None
    if resume_path is not None:
        saved_state, resume_path = ckpt.load_checkpoint(resume_path)
        saved_cfg = dict(saved_state.get("config") or {})
        saved_cfg.pop("out", None)
        for key in SHAPE_KEYS:
            if key in explicit and key in saved_cfg:
                mine = parse_size(explicit[key]) if key == "input_size" else explicit[key]
                theirs = tuple(saved_cfg[key]) if key == "input_size" else saved_cfg[key]
                if mine != theirs:
                    raise RecipeError(
                        f"'{out}' holds a run with {key.replace('_', '-')}={saved_cfg[key]!r}, "
                        "but this command asks "
                        f"for {explicit[key]!r}; use another --out for a new run (or --resume never)"
                    )
    explicit["out"] = str(out)
    cfg = resolve_config(explicit, saved_cfg)
    env = dist_utils.setup(cfg.device)
    try:
        trainer = Pretrainer(cfg, env, resume_path, saved_state)
        return trainer.run(explicit)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        dist_utils.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sparsify-pretrain`` (or ``python -m sparsify.recipes.pretrain``): the exit code."""
    return run_main(PROG, lambda: _pretrain(argv))


if __name__ == "__main__":
    sys.exit(main())
