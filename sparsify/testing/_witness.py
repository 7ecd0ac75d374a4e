"""The float64 rounding witness: tell fp32 rounding apart from contract violations.

A failed fp32 comparison is decided in float64 when a float64 copy of the encoder can run: each
side's distance to its float64 twin is allowed on top of the tolerance, so (by the triangle
inequality) the verdict is the float64 comparison held to the fp32 tolerance. A leak shows in
float64 too and still fails; rounding (1e-12 in float64 where fp32 differs by 1e-3 on a deep
pre-activation network over a few visible sites) passes.

When no float64 copy can run (an op without a float64 kernel, a device without float64), the
tolerance grows with depth instead (:func:`rounding_allowance`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn as nn

from ._results import CheckResult
from ._state import preserved_state

#: Constant of the depth allowance (:func:`rounding_allowance`). Rounding in one layer is about
#: ``lambda * sqrt(n) * eps`` of its scale (probabilistic rounding analysis of an n-term sum, Higham
#: and Mary 2019: ``lambda`` standard deviations) and independent layers add in quadrature at the unit
#: gain that normalisations keep, so L layers give ``c * sqrt(L) * eps``. ``c`` is calibrated:
#: lambda 4 x sqrt(n) 64 (a 3x3 convolution over ~450 channels) = 256 covers plain deep stacks, but
#: normalisations over a few visible sites amplify rounding: a 22-block pre-activation network (94
#: layers) at 85% masking differs by 1.2e-3 of its scale between canvases in fp32 (9e-13 in
#: float64), i.e. c = 1040; 2**12 keeps a 4x margin. A leak moves features by a sizeable fraction
#: of their scale; at 94 layers the allowance is 4.7e-3 of it, at 1000 layers 1.5e-2.
ROUNDING_CONSTANT = 4096.0

#: The depth allowance never exceeds this fraction of the feature scale: beyond it a leak could hide
#: (float16 / bfloat16 deep networks without a float64 twin keep failing; check them in float32).
MAX_ROUNDING_ALLOWANCE = 1e-2

_REDUCTIONS = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
)


def rounding_layers(module: nn.Module) -> int:
    """How many reductions a feature may pass through: the module's convolutions, linear layers
    and normalisations (each counted once; an upper bound on the depth of any path)."""
    seen = {id(m) for m in module.modules() if isinstance(m, _REDUCTIONS)}
    return max(1, len(seen))


def rounding_allowance(module: nn.Module, dtype: torch.dtype) -> float:
    """Rounding error, relative to the feature scale, allowed when no float64 twin can decide:
    ``ROUNDING_CONSTANT * eps(dtype) * sqrt(layers)`` (see :data:`ROUNDING_CONSTANT`,
    :func:`rounding_layers`), at most :data:`MAX_ROUNDING_ALLOWANCE`. 0 for float64 and
    non-floating dtypes."""
    if not dtype.is_floating_point or dtype == torch.float64:
        return 0.0
    allowance = ROUNDING_CONSTANT * torch.finfo(dtype).eps * math.sqrt(rounding_layers(module))
    return min(allowance, MAX_ROUNDING_ALLOWANCE)


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
    """Re-judge a failed fp32 comparison in float64 (the twins' rounding allowed), or, when no float64
    twin can run, with the depth allowance ``compare(None, None, extra_atol=...)``
    (:func:`rounding_allowance`). A disabled witness (``fp64_witness=False``) keeps the fixed
    tolerances."""
    if result.passed or witness is None or not witness.enabled or not x.is_floating_point() or (
        x.dtype == torch.float64
    ):
        return result
    rerun = witness.rerun(fn) if witness.applies(x) else None
    if rerun is None:
        why = witness.error
        result = compare(None, None, extra_atol=rounding_allowance(witness.enc, x.dtype))
        result.detail += f"\n(fp64 twin unavailable: {why}; tolerance scaled with depth instead)"
        return result
    return compare(*rerun)
