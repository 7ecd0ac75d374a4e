"""Check: canvas invariance (whole masked patches of garbage around the image change nothing)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._compare import _compare_features
from ._geometry import _garbage_like, _mask_at
from ._results import ATOL, RTOL, CheckResult, _raise_if_failed
from ._state import _forward, _mode_name, _modes, preserved_state
from ._witness import _resolve_witness, _with_witness, _Witness


def _canvas_pad(pad: Sequence[int]) -> tuple[int, int, int, int]:
    if len(pad) == 2:
        return (0, 0, int(pad[0]), int(pad[1]))
    if len(pad) == 4:
        return tuple(int(p) for p in pad)  # type: ignore[return-value]
    raise ValueError(f"canvas pad must be (bottom, right) or (top, left, bottom, right) patches, got {pad}")


def check_canvas_invariant(
    enc: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    pad: Sequence[int] = (1, 2),
    atol: float = ATOL,
    rtol: float = RTOL,
    train: bool = True,
    eval: bool = True,
    generator: torch.Generator | None = None,
    fp64_witness: bool | _Witness = True,
) -> list[CheckResult]:
    """Surround the image with whole masked patches of garbage, and replace the pixels under masked
    patches by other garbage: the original region of every feature must not change.

    ``pad`` counts patches: ``(bottom, right)`` (the contract's form) or ``(top, left, bottom,
    right)``. Padding at the top/left as well is equally valid for a correct encoder (every stride
    divides R, so the sampling grid stays aligned) and also catches constant garbage at masked sites
    (e.g. ``sigmoid(0)``) leaking through strided convolutions, which only read their left padding.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    r = int(enc.downsample_ratio)
    b, c, h, w = x.shape
    top, left, bottom, right = _canvas_pad(pad)
    big_h, big_w = h + (top + bottom) * r, w + (left + right) * r
    oy, ox = top * r, left * r
    big = _garbage_like(x, (b, c, big_h, big_w), g)
    visible_px = _mask_at(mask, (h, w))
    big[..., oy : oy + h, ox : ox + w] = torch.where(visible_px, x, big[..., oy : oy + h, ox : ox + w])
    big_mask = F.pad(mask, (left, right, top, bottom), value=False)
    sides = [f"{n} {p}" for n, p in (("top", top), ("left", left), ("bottom", bottom), ("right", right)) if p]
    name = f"canvas invariance ({', '.join(sides) or 'no'} masked patches)"
    witness = _resolve_witness(fp64_witness, enc, None)
    results = []
    for mode in _modes(train, eval):
        with preserved_state(enc):
            ref = _forward(enc, x, mask, train=mode, fixed=True)
        with preserved_state(enc):
            out = _forward(enc, big, big_mask, train=mode, fixed=True)

        def compare(out64=None, ref64=None, out=out, ref=ref, mode=mode):
            return _compare_features(
                enc,
                name,
                _mode_name(mode),
                out,
                ref,
                atol,
                rtol,
                ref_size=(h, w),
                out_size=(big_h, big_w),
                offset=(oy, ox),
                outs64=out64,
                refs64=ref64,
            )

        def fp64(enc64, _dense64, mode=mode):
            ref64 = _forward(enc64, x.double(), mask, train=mode, fixed=True)
            return _forward(enc64, big.double(), big_mask, train=mode, fixed=True), ref64

        results.append(_with_witness(compare(), witness, x, fp64, compare))
    return results


def assert_canvas_invariant(
    enc: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    pad: Sequence[int] = (1, 2),
    atol: float = ATOL,
    rtol: float = RTOL,
    train: bool = True,
    eval: bool = True,
    generator: torch.Generator | None = None,
    fp64_witness: bool = True,
) -> None:
    """Assert canvas invariance (see :func:`check_canvas_invariant`)."""
    _raise_if_failed(
        check_canvas_invariant(
            enc,
            x,
            mask,
            pad=pad,
            atol=atol,
            rtol=rtol,
            train=train,
            eval=eval,
            generator=generator,
            fp64_witness=fp64_witness,
        ),
        "canvas invariance:",
    )
