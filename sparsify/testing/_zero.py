"""Check: every returned feature is exactly 0 at masked sites."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._geometry import _feature_hw, _locate, _mask_at, _stage_label, _to_nchw
from ._results import CheckResult, _raise_if_failed
from ._state import _forward, _mode_name, _modes, preserved_state


def check_zero_at_masked(
    enc: nn.Module, x: torch.Tensor, mask: torch.Tensor, *, train: bool = True, eval: bool = True
) -> list[CheckResult]:
    """Every feature ``enc(x, mask)`` returns must be exactly 0 at masked sites."""
    size = tuple(x.shape[2:])
    results = []
    for mode in _modes(train, eval):
        with preserved_state(enc):
            feats = _forward(enc, x, mask, train=mode)
        per, details, worst = [], [], 0.0
        for i, f in enumerate(feats):
            try:
                f = _to_nchw(f, _feature_hw(enc, i, size))
            except AssertionError as e:
                per.append(float("inf"))
                details.append(f"{_stage_label(enc, i)}: {e}")
                worst = float("inf")
                continue
            hidden = ~_mask_at(mask, tuple(f.shape[2:]))
            vals = torch.where(hidden, f.double(), 0.0)
            bad = vals.abs()
            bad = torch.where(torch.isfinite(bad), bad, torch.full_like(bad, float("inf")))
            err = float(bad.max()) if bad.numel() else 0.0
            per.append(err)
            worst = max(worst, err)
            if err != 0.0:
                idx = int(bad.flatten().argmax())
                details.append(
                    f"{_stage_label(enc, i)}: |value| {err:.3g} at masked site {_locate(idx, bad.shape)}"
                    f" ({int((bad != 0).sum())} nonzero masked values)"
                )
        results.append(
            CheckResult(
                "zero at masked sites",
                _mode_name(mode),
                worst == 0.0,
                worst,
                1.0,
                "exactly 0",
                "\n".join(details),
                per,
            )
        )
    return results


def assert_zero_at_masked(
    enc: nn.Module, x: torch.Tensor, mask: torch.Tensor, *, train: bool = True, eval: bool = True
) -> None:
    """Assert every feature of ``enc(x, mask)`` is exactly 0 at masked sites (both modes by default)."""
    _raise_if_failed(check_zero_at_masked(enc, x, mask, train=train, eval=eval), "zero at masked sites:")
