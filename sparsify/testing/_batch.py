"""Check: fully masked samples appended to a batch change no other sample's output."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._compare import _compare_features
from ._geometry import _garbage_like
from ._results import ATOL, RTOL, CheckResult, _raise_if_failed
from ._state import _forward, _mode_name, _modes, preserved_state
from ._witness import _resolve_witness, _with_witness, _Witness


def check_masked_samples_invisible(
    enc: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    extra: int = 1,
    atol: float = ATOL,
    rtol: float = RTOL,
    train: bool = True,
    eval: bool = True,
    generator: torch.Generator | None = None,
    fp64_witness: bool | _Witness = True,
) -> list[CheckResult]:
    """Appending ``extra`` samples whose mask is all False must not change the other samples' outputs."""
    g = generator if generator is not None else torch.Generator().manual_seed(1)
    b = x.shape[0]
    xx = torch.cat([x, _garbage_like(x, (extra, *x.shape[1:]), g)])
    mm = torch.cat([mask, torch.zeros(extra, *mask.shape[1:], dtype=mask.dtype, device=mask.device)])
    size = tuple(x.shape[2:])
    witness = _resolve_witness(fp64_witness, enc, None)
    results = []
    for mode in _modes(train, eval):
        with preserved_state(enc):
            ref = _forward(enc, x, mask, train=mode, fixed=True)
        with preserved_state(enc):
            out = _forward(enc, xx, mm, train=mode, fixed=True)

        def compare(out64=None, ref64=None, out=out, ref=ref, mode=mode, extra_atol=0.0):
            return _compare_features(
                enc,
                f"fully masked samples invisible (+{extra})",
                _mode_name(mode),
                out,
                ref,
                atol,
                rtol,
                ref_size=size,
                batch=b,
                outs64=out64,
                refs64=ref64,
                extra_atol=extra_atol,
            )

        def fp64(enc64, _dense64, mode=mode):
            ref64 = _forward(enc64, x.double(), mask, train=mode, fixed=True)
            return _forward(enc64, xx.double(), mm, train=mode, fixed=True), ref64

        results.append(_with_witness(compare(), witness, x, fp64, compare))
    return results


def assert_masked_samples_invisible(
    enc: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    train: bool = True,
    eval: bool = True,
    generator: torch.Generator | None = None,
    fp64_witness: bool = True,
) -> None:
    """Assert that appending a fully masked sample changes no other sample's output."""
    _raise_if_failed(
        check_masked_samples_invisible(
            enc, x, mask, atol=atol, rtol=rtol, train=train, eval=eval, generator=generator, fp64_witness=fp64_witness
        ),
        "fully masked samples invisible:",
    )
