"""Check: with nothing masked the encoder equals the dense network."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._compare import _compare_features
from ._results import DENSE_ATOL, DENSE_RTOL, CheckResult, _raise_if_failed
from ._state import _forward, _mode_name, _modes, preserved_state
from ._witness import _resolve_witness, _with_witness, _Witness


def check_dense_equal(
    enc: nn.Module,
    x: torch.Tensor,
    *,
    atol: float = DENSE_ATOL,
    rtol: float = DENSE_RTOL,
    train: bool = True,
    eval: bool = True,
    dense: nn.Module | None = None,
    fp64_witness: bool | _Witness = True,
) -> list[CheckResult]:
    """``enc(x, None)`` and ``enc(x, all-True mask)`` must equal ``enc.dense_encoder()(x)``.

    Both are held to ``atol``/``rtol``. With ``fp64_witness`` a failed fp32 comparison is re-judged
    allowing each side's own rounding error (its distance to a float64 twin).
    """
    dense = enc.dense_encoder() if dense is None else dense
    witness = _resolve_witness(fp64_witness, enc, dense)
    size = (x.shape[-2], x.shape[-1])
    r = int(enc.downsample_ratio)
    full = torch.ones(x.shape[0], 1, size[0] // r, size[1] // r, dtype=torch.bool, device=x.device)
    results = []
    for mode in _modes(train, eval):
        with preserved_state(enc, dense):
            ref = _forward(dense, x, train=mode)
        for label, m in (("mask=None", None), ("all-visible mask", full)):
            with preserved_state(enc, dense):
                out = _forward(enc, x, m, train=mode)
            name = f"dense equality ({label})"
            result = _compare_features(enc, name, _mode_name(mode), out, ref, atol, rtol, ref_size=size)

            def fp64(enc64, dense64, m=m, mode=mode):
                x64 = x.double()
                ref64 = _forward(dense64, x64, train=mode)
                return _forward(enc64, x64, m, train=mode), ref64

            def compare(out64, ref64, out=out, ref=ref, name=name, mode=mode):
                return _compare_features(
                    enc, name, _mode_name(mode), out, ref, atol, rtol, ref_size=size, outs64=out64, refs64=ref64
                )

            results.append(_with_witness(result, witness, x, fp64, compare))
    return results


def assert_dense_equal(
    enc: nn.Module,
    x: torch.Tensor,
    *,
    atol: float = DENSE_ATOL,
    rtol: float = DENSE_RTOL,
    train: bool = True,
    eval: bool = True,
    fp64_witness: bool = True,
) -> None:
    """Assert that with nothing masked the encoder equals ``enc.dense_encoder()``."""
    _raise_if_failed(
        check_dense_equal(enc, x, atol=atol, rtol=rtol, train=train, eval=eval, fp64_witness=fp64_witness),
        "dense equality:",
    )
