"""The float64 rounding witness: tell fp32 rounding apart from contract violations."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn

from ._results import CheckResult
from ._state import preserved_state


class _Witness:
    """Float64 twins of an encoder and its dense reference, built lazily on the first failed fp32
    comparison: a discrepancy no larger than the two sides' own fp32 rounding (their distance to the
    same computation in float64) is not a contract violation. Deep stacks of normalisations over a
    few active sites amplify rounding far beyond any fixed fp32 tolerance; the twins tell that apart
    from a real leak. The twins are deep copies: the model under test is never converted.
    """

    def __init__(
        self, enc: nn.Module, dense: nn.Module | None = None, enabled: bool = True, model: nn.Module | None = None
    ) -> None:
        self.enc, self.dense, self.enabled, self.model = enc, dense, enabled, model
        self._twins: tuple[nn.Module, nn.Module | None] | None = None
        self.model64: nn.Module | None = None
        self.error: str | None = None

    def applies(self, x: torch.Tensor) -> bool:
        return self.enabled and self.error is None and x.is_floating_point() and x.dtype != torch.float64

    def twins(self) -> tuple[nn.Module, nn.Module | None]:
        if self._twins is None:
            with preserved_state(self.enc, self.dense, self.model):  # copy the state as the user left it
                # One deep copy keeps the modules the three share shared in the twins.
                enc64, dense64, model64 = copy.deepcopy((self.enc, self.dense, self.model))
                for twin in (model64, enc64, dense64):
                    if twin is not None:
                        twin.double()
            self._twins = (enc64, dense64)
            self.model64 = model64
        return self._twins

    def rerun(self, fn: Callable[[nn.Module, nn.Module | None], tuple]) -> tuple | None:
        """``fn(enc64, dense64)`` under preserved state, or None (noting why) if fp64 cannot run."""
        try:
            enc64, dense64 = self.twins()
            with preserved_state(enc64, dense64, self.model64):
                return fn(enc64, dense64)
        except Exception as e:  # e.g. an op without a float64 kernel: keep the fp32 verdict
            self.error = f"{type(e).__name__}: {e}"
            return None


def _resolve_witness(
    fp64_witness: bool | _Witness, enc: nn.Module, dense: nn.Module | None, model: nn.Module | None = None
) -> _Witness | None:
    if isinstance(fp64_witness, _Witness):
        return fp64_witness
    return _Witness(enc, dense, model=model) if fp64_witness else None


def _with_witness(
    result: CheckResult, witness: _Witness | None, x: torch.Tensor, fn: Callable, compare: Callable
) -> CheckResult:
    """Re-judge a failed fp32 comparison with the fp64 twins' rounding allowance."""
    if result.passed or witness is None or not witness.applies(x):
        return result
    rerun = witness.rerun(fn)
    if rerun is None:
        result.detail += f"\n(fp64 twin unavailable: {witness.error})"
        return result
    return compare(*rerun)
