"""Check: canvas invariance (whole masked patches of garbage around the image change nothing)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._compare import _compare_features
from ._geometry import _garbage_like, _mask_at, patch_of, ratio_of
from ._results import ATOL, RTOL, CheckResult, _raise_if_failed
from ._state import _forward, _mode_name, _modes, preserved_state
from ._witness import _resolve_witness, _with_witness, _Witness


def _canvas_pad(pad: Sequence[int], rank: int = 2) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(cells before, cells after) per axis from ``pad``: ``rank`` entries (after the end of each axis:
    (bottom, right) for images) or ``2 * rank`` (all the starts, then all the ends: (top, left,
    bottom, right))."""
    if len(pad) == rank:
        return (0,) * rank, tuple(int(p) for p in pad)
    if len(pad) == 2 * rank:
        return tuple(int(p) for p in pad[:rank]), tuple(int(p) for p in pad[rank:])
    raise ValueError(f"canvas pad must hold {rank} (ends) or {2 * rank} (starts, then ends) counts of patches "
                     f"for a {rank}-D input, e.g. (bottom, right) or (top, left, bottom, right) in 2-D; got {pad}")


def default_canvas_pads(rank: int) -> tuple[tuple[int, ...], ...]:
    """The contract's padding at the ends of the axes, and one at their starts (see
    :func:`check_canvas_invariant`), for inputs of this spatial rank."""
    if rank == 2:
        return ((1, 2), (2, 1, 0, 0))
    ends = tuple(1 + i % 2 for i in range(rank))
    starts = tuple(2 - i % 2 for i in range(rank)) + (0,) * rank
    return ends, starts


def check_canvas_invariant(
    enc: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    pad: Sequence[int] | None = None,
    atol: float = ATOL,
    rtol: float = RTOL,
    train: bool = True,
    eval: bool = True,
    generator: torch.Generator | None = None,
    fp64_witness: bool | _Witness = True,
) -> list[CheckResult]:
    """Surround the image with whole masked patches of garbage, and replace the pixels under masked
    patches by other garbage: the original region of every feature must not change.

    ``pad`` counts blocks of the downsample ratio R per axis (whole masked patches): ``(bottom,
    right)`` (the contract's form) or ``(top, left, bottom, right)`` for images; for other ranks one
    count per axis (ends), or the starts then the ends (default: :func:`default_canvas_pads`).
    Padding at the top/left as well is equally valid for a correct encoder (every stride divides R,
    so the sampling grid stays aligned) and also catches constant garbage at masked sites (e.g.
    ``sigmoid(0)``) leaking through strided convolutions, which only read their left padding.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    rank = x.dim() - 2
    r, patch = ratio_of(enc, rank), patch_of(enc, rank)
    pad = default_canvas_pads(rank)[0] if pad is None else pad
    starts, ends = _canvas_pad(pad, rank)
    size = tuple(x.shape[2:])
    big_size = tuple(n + (s + e) * k for n, s, e, k in zip(size, starts, ends, r))
    offset = tuple(s * k for s, k in zip(starts, r))
    big = _garbage_like(x, (*x.shape[:2], *big_size), g)
    region = (..., *(slice(o, o + n) for o, n in zip(offset, size)))
    visible_px = _mask_at(mask, size)
    big[region] = torch.where(visible_px, x, big[region])
    cells = [(s * k // p, e * k // p) for s, e, k, p in zip(starts, ends, r, patch)]  # mask cells per R block
    big_mask = F.pad(mask, tuple(n for pair in reversed(cells) for n in pair), value=False)
    names = {1: ("start",), 2: ("top", "left"), 3: ("front", "top", "left")}.get(rank, tuple(
        f"axis {i} start" for i in range(rank)))
    end_names = {1: ("end",), 2: ("bottom", "right"), 3: ("back", "bottom", "right")}.get(rank, tuple(
        f"axis {i} end" for i in range(rank)))
    sides = [f"{n} {p}" for n, p in zip(names + end_names, starts + ends) if p]
    name = f"canvas invariance ({', '.join(sides) or 'no'} masked patches)"
    witness = _resolve_witness(fp64_witness, enc, None)
    results = []
    for mode in _modes(train, eval):
        with preserved_state(enc):
            ref = _forward(enc, x, mask, train=mode, fixed=True)
        with preserved_state(enc):
            out = _forward(enc, big, big_mask, train=mode, fixed=True)

        def compare(out64=None, ref64=None, out=out, ref=ref, mode=mode, extra_atol=0.0):
            return _compare_features(
                enc,
                name,
                _mode_name(mode),
                out,
                ref,
                atol,
                rtol,
                ref_size=size,
                out_size=big_size,
                offset=offset,
                outs64=out64,
                refs64=ref64,
                extra_atol=extra_atol,
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
    pad: Sequence[int] | None = None,
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
