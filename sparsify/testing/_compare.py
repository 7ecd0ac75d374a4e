"""Tensor and feature-list comparison relative to the feature scale, locating the worst error."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ._geometry import _feature_hw, _locate, _stage_label, _to_nchw
from ._results import CheckResult


def _compare(
    out: torch.Tensor,
    ref: torch.Tensor,
    atol: float,
    rtol: float,
    where: torch.Tensor | None = None,
    slack: torch.Tensor | None = None,
) -> tuple[bool, float, float, str]:
    """Compare two tensors; returns (passed, max abs error, scale, location of the worst error).

    ``where`` (broadcastable bool) restricts the comparison to those elements. ``slack`` (same shape)
    is added to the allowed error elementwise (the rounding error of each side, see ``_Witness``).
    """
    if out.shape != ref.shape:
        return False, float("inf"), 1.0, f"shape {tuple(out.shape)} vs reference {tuple(ref.shape)}"
    a = out.detach().double()
    b = ref.detach().double()
    if where is not None:
        w = where.expand_as(b)
        a = torch.where(w, a, 0.0)
        b = torch.where(w, b, 0.0)
    finite_b = torch.isfinite(b)
    scale = max(1.0, float(b.abs()[finite_b].max()) if finite_b.any() else 1.0)
    nonfinite = ~torch.isfinite(a) | ~finite_b
    if nonfinite.any():
        idx = int(nonfinite.flatten().nonzero()[0])
        return False, float("inf"), scale, f"non-finite value at {_locate(idx, b.shape)}"
    err = (a - b).abs()
    if err.numel() == 0:
        return True, 0.0, scale, ""
    idx = int(err.flatten().argmax())
    max_err = float(err.flatten()[idx])
    allowed = atol * scale + rtol * b.abs()
    if slack is not None:
        allowed = allowed + slack.detach().double()
    passed = bool((err <= allowed).all())
    detail = (
        f"worst at {_locate(idx, b.shape)}: got {float(a.flatten()[idx]):.6g}, expected {float(b.flatten()[idx]):.6g}"
    )
    return passed, max_err, scale, detail


def _compare_features(
    enc: nn.Module,
    name: str,
    mode: str,
    outs: Sequence[torch.Tensor],
    refs: Sequence[torch.Tensor],
    atol: float,
    rtol: float,
    *,
    ref_size: tuple[int, ...],
    out_size: tuple[int, ...] | None = None,
    offset: tuple[int, ...] | None = None,
    batch: int | None = None,
    outs64: Sequence[torch.Tensor] | None = None,
    refs64: Sequence[torch.Tensor] | None = None,
    extra_atol: float = 0.0,
) -> CheckResult:
    """Compare feature lists.

    ``ref_size`` / ``out_size`` are the input sizes the two lists were computed at; when they differ
    only the region of each output matching the reference is compared, starting at ``offset`` input
    sites from the start of every axis (top-left in 2-D). ``batch``: compare only the first ``batch``
    samples. ``outs64`` / ``refs64``: the same computations in float64; each side's distance to its
    fp64 twin is allowed on top of the tolerance (the difference is then explained by rounding, not
    by the contract). ``extra_atol``: a rounding allowance relative to the feature scale, added to
    ``atol`` when no float64 twin could run (``rounding_allowance``).
    """
    ref_size, out_size = tuple(ref_size), tuple(ref_size if out_size is None else out_size)
    offset = (0,) * len(ref_size) if offset is None else tuple(offset)
    tol = f"{atol:g}*scale + {rtol:g}*|ref|"
    if extra_atol:
        tol += f" + {extra_atol:.2g}*scale (fp32 rounding allowance for the network's depth)"
    if len(outs) != len(refs):
        return CheckResult(
            name, mode, False, float("inf"), tolerance=tol, detail=f"{len(outs)} features vs {len(refs)}"
        )
    witness = outs64 is not None and refs64 is not None
    if witness:
        tol += " + fp32 rounding (fp64 twin)"
    per, worst, worst_scale, details, ok = [], 0.0, 1.0, [], True
    worst_slack = 0.0

    def align(o: torch.Tensor, r: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = _to_nchw(r, _feature_hw(enc, i, ref_size))
        o = _to_nchw(o, _feature_hw(enc, i, out_size))
        if out_size != ref_size:
            starts = [at * n // full for at, n, full in zip(offset, r.shape[2:], ref_size)]
            o = o[(..., *(slice(s, s + n) for s, n in zip(starts, r.shape[2:])))]
        if batch is not None:
            o, r = o[:batch], r[:batch]
        return o, r

    for i, (o, r) in enumerate(zip(outs, refs)):
        try:
            o, r = align(o, r, i)
            slack = None
            if witness:
                o64, r64 = align(outs64[i], refs64[i], i)
                if o64.shape == o.shape and r64.shape == r.shape:
                    slack = (o.double() - o64).abs() + (r.double() - r64).abs()
                    worst_slack = max(worst_slack, float(slack.max()) if slack.numel() else 0.0)
        except (AssertionError, IndexError) as e:
            per.append(float("inf"))
            worst, ok = float("inf"), False
            details.append(f"{_stage_label(enc, i)}: {e}")
            continue
        passed, err, scale, where = _compare(o, r, atol + extra_atol, rtol, slack=slack)
        per.append(err)
        if err > worst or (err == worst and not passed):
            worst, worst_scale = err, scale
        if not passed:
            ok = False
            details.append(f"{_stage_label(enc, i)}: max |diff| {err:.3g} (scale {scale:.3g}), {where}")
    detail = "\n".join(details)
    if witness:
        note = f"fp32 rounding of the two sides (vs fp64 twins) up to {worst_slack:.3g}"
        detail = f"{detail}\n{note}" if detail else note
    return CheckResult(name, mode, ok, worst, worst_scale, tol, detail, per)
