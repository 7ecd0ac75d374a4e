"""Check results and their report: :class:`CheckResult`, :func:`format_results`, default tolerances."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

#: Default tolerances (fp32). Errors are measured relative to the feature scale
#: ``max(1, max |reference|)``: an element passes when ``|a - b| <= atol * scale + rtol * |b|``.
ATOL = 1e-4
RTOL = 1e-4
DENSE_ATOL = 1e-5
DENSE_RTOL = 1e-5


@dataclass
class CheckResult:
    """Outcome of one contract check.

    Attributes:
        name: the check, e.g. ``"canvas invariance"``.
        mode: ``"train"``, ``"eval"`` or ``""`` when the mode does not apply.
        passed: whether it held.
        max_error: worst absolute error found (for zero-at-masked: the largest |value| at a masked
            site); ``inf`` when something was non-finite or shapes disagreed.
        scale: the feature scale the tolerance was relative to (``max(1, max |reference|)``).
        tolerance: a human-readable description of the tolerance used.
        detail: where the worst error occurred (feature, stage, position) or why the check failed.
        per_feature: worst absolute error per returned feature.
        context: extra label, e.g. the input size (set by :func:`sparsify.verify`).
    """

    name: str
    mode: str
    passed: bool
    max_error: float
    scale: float = 1.0
    tolerance: str = ""
    detail: str = ""
    per_feature: list[float] = field(default_factory=list)
    context: str = ""

    @property
    def label(self) -> str:
        """``name [mode, context]``."""
        tags = ", ".join(t for t in (self.mode, self.context) if t)
        return f"{self.name} [{tags}]" if tags else self.name

    def line(self) -> str:
        """One report line."""
        status = "ok  " if self.passed else "FAIL"
        err = f"max error {self.max_error:.3g}"
        if self.scale != 1.0:
            err += f" (feature scale {self.scale:.3g})"
        tol = f", tol {self.tolerance}" if self.tolerance else ""
        text = f"{status} {self.label:<52} {err}{tol}"
        if self.detail and not self.passed:
            text += "\n       " + self.detail.replace("\n", "\n       ")
        return text


def format_results(results: Sequence[CheckResult], header: str = "") -> str:
    """A readable multi-line report of ``results`` (failures first)."""
    failed = [r for r in results if not r.passed]
    lines = [header] if header else []
    lines.append(f"{len(failed)} of {len(results)} checks failed" if failed else f"all {len(results)} checks passed")
    lines += ["  " + r.line().replace("\n", "\n  ") for r in failed]
    lines += ["  " + r.line() for r in results if r.passed]
    return "\n".join(lines)


def _raise_if_failed(results: Sequence[CheckResult], header: str) -> None:
    if any(not r.passed for r in results):
        raise AssertionError(format_results(results, header))
