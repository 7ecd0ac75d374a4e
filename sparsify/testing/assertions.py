"""Assertions for the sparse-encoder contract (design.md section 2).

The main entry point is :func:`assert_sparse_semantics`, which wraps a plain module with
``sparsify.wrap`` (or takes an already wrapped encoder) and checks, in train and eval mode:

* **zero at masked sites**: every returned feature is exactly 0 where the mask is False;
* **dense equality**: with nothing masked (``mask=None`` and an all-True mask) the features equal
  those of ``enc.dense_encoder()``, i.e. the unmodified network ops;
* **canvas invariance**: padding the image right/bottom with whole masked patches (filled with
  garbage) and changing the pixels under masked patches leaves the original region of every
  feature unchanged;
* **fully masked samples are invisible**: appending a sample whose mask is all False changes no
  other sample's output (train-mode BatchNorm statistics ignore it);
* when a plain module is given: the encoder **shares the module's parameters and buffers** (same
  objects, same state_dict names) and the module is **left untouched** (same outputs, same state).

Each check restores every buffer (BatchNorm running statistics, ``num_batches_tracked``), the
train/eval flag of every submodule and the global RNG state afterwards, so the model under test is
left exactly as it was.

The individual checks are available as ``assert_*`` helpers that raise ``AssertionError`` and as
``check_*`` functions that return :class:`CheckResult` records (used by :func:`sparsify.verify`).
For one adapter, :func:`assert_matches_reference` compares its output at active sites with a
gather-based reference (:func:`gather_active`, :func:`scatter_active`, :func:`reference_batch_norm`,
:func:`reference_group_norm`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CheckResult",
    "assert_canvas_invariant",
    "assert_dense_equal",
    "assert_masked_samples_invisible",
    "assert_matches_reference",
    "assert_shares_parameters",
    "assert_sparse_semantics",
    "assert_zero_at_masked",
    "check_canvas_invariant",
    "check_dense_equal",
    "check_masked_samples_invisible",
    "check_model_untouched",
    "check_shares_parameters",
    "check_zero_at_masked",
    "format_results",
    "gather_active",
    "preserved_state",
    "run_contract_checks",
    "reference_batch_norm",
    "reference_group_norm",
    "scatter_active",
]

#: Default tolerances (fp32). Errors are measured relative to the feature scale
#: ``max(1, max |reference|)``: an element passes when ``|a - b| <= atol * scale + rtol * |b|``.
ATOL = 1e-4
RTOL = 1e-4
DENSE_ATOL = 1e-5
DENSE_RTOL = 1e-5


# ----------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# State preservation and running
# ----------------------------------------------------------------------------------------------------


def _unique_modules(modules: Sequence[nn.Module | None]) -> list[nn.Module]:
    seen: dict[int, nn.Module] = {}
    for module in modules:
        if module is None:
            continue
        for m in module.modules():
            seen.setdefault(id(m), m)
    return list(seen.values())


@contextlib.contextmanager
def preserved_state(*modules: nn.Module | None) -> Iterator[None]:
    """Restore every buffer, every submodule's train/eval flag and the global RNG state on exit.

    Buffers are restored in place (``copy_``), so buffer objects shared between an encoder and the
    user's model stay shared. Parameters are not touched by forward passes and are not copied.
    """
    mods = _unique_modules(modules)
    flags = [(m, m.training) for m in mods]
    buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for m in mods:
        for b in m.buffers(recurse=False):
            if b is not None and id(b) not in buffers:
                buffers[id(b)] = (b, b.detach().clone())
    with torch.random.fork_rng(devices=_cuda_devices(mods)):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers.values():
                    b.copy_(saved)
            for m, flag in flags:
                m.training = flag


def _cuda_devices(mods: Sequence[nn.Module]) -> list[int]:
    devices = set()
    for m in mods:
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if t is not None and t.is_cuda:
                devices.add(t.device.index or 0)
    return sorted(devices)


def _as_list(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return list(out.values())
    return list(out)


def _forward(module: nn.Module, *args, train: bool, seed: int = 0) -> list[torch.Tensor]:
    """Run ``module(*args)`` in the given mode under no_grad with a fixed RNG seed (so dropout / drop
    path draw the same numbers in both runs being compared). Buffers are NOT restored here."""
    module.train(train)
    torch.manual_seed(seed)
    with torch.no_grad():
        return [t.detach() for t in _as_list(module(*args))]


def _modes(train: bool, eval: bool) -> list[bool]:
    modes = ([True] if train else []) + ([False] if eval else [])
    if not modes:
        raise ValueError("at least one of train=True / eval=True is needed")
    return modes


def _mode_name(train: bool) -> str:
    return "train" if train else "eval"


# ----------------------------------------------------------------------------------------------------
# Feature geometry
# ----------------------------------------------------------------------------------------------------


def _stage_label(enc: nn.Module, i: int) -> str:
    stages = getattr(enc, "stages", None)
    strides = getattr(enc, "feature_strides", None)
    name = None
    if stages is not None and i < len(stages):
        st = stages[i]
        name = getattr(st, "name", None)
        if name is None and isinstance(st, (tuple, list)) and st:
            name = st[0]
    stride = strides[i] if strides is not None and i < len(strides) else None
    parts = [f"feature {i}"]
    if name is not None:
        parts.append(f"stage {name!r}")
    if stride is not None:
        parts.append(f"stride {stride}")
    return ", ".join(parts)


def _feature_hw(enc: nn.Module, i: int, size: tuple[int, int]) -> tuple[int, int] | None:
    strides = getattr(enc, "feature_strides", None)
    if strides is None or i >= len(strides):
        return None
    s = int(strides[i])
    return (size[0] // s, size[1] // s)


def _to_nchw(feat: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
    """View a feature as (B, C, h, w); accepts channels-last (B, h, w, C) features too."""
    if feat.dim() != 4:
        raise AssertionError(f"expected a 4-D feature map, got shape {tuple(feat.shape)}")
    if hw is None or tuple(feat.shape[-2:]) == tuple(hw):
        return feat
    if tuple(feat.shape[1:3]) == tuple(hw):
        return feat.permute(0, 3, 1, 2)
    raise AssertionError(f"feature of shape {tuple(feat.shape)} does not have the expected spatial size {hw}")


def _mask_at(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (B, 1, h, w) bool mask to ``hw`` (bool)."""
    if tuple(mask.shape[-2:]) == tuple(hw):
        return mask.bool()
    return F.interpolate(mask.float(), size=tuple(hw), mode="nearest").bool()


def _locate(index: int, shape: Sequence[int]) -> str:
    names = ("b", "c", "y", "x") if len(shape) == 4 else tuple(f"d{i}" for i in range(len(shape)))
    coords = []
    for size in reversed(shape):
        coords.append(index % size)
        index //= size
    coords.reverse()
    return "(" + ", ".join(f"{n}={c}" for n, c in zip(names, coords)) + ")"


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
    ref_size: tuple[int, int],
    out_size: tuple[int, int] | None = None,
    offset: tuple[int, int] = (0, 0),
    batch: int | None = None,
    outs64: Sequence[torch.Tensor] | None = None,
    refs64: Sequence[torch.Tensor] | None = None,
) -> CheckResult:
    """Compare feature lists.

    ``ref_size`` / ``out_size`` are the input sizes the two lists were computed at; when they differ
    only the region of each output matching the reference is compared, starting at ``offset`` input
    pixels from the top-left. ``batch``: compare only the first ``batch`` samples. ``outs64`` /
    ``refs64``: the same computations in float64; each side's distance to its fp64 twin is allowed on
    top of the tolerance (the difference is then explained by rounding, not by the contract).
    """
    out_size = ref_size if out_size is None else out_size
    tol = f"{atol:g}*scale + {rtol:g}*|ref|"
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
            fy = offset[0] * r.shape[-2] // ref_size[0]
            fx = offset[1] * r.shape[-1] // ref_size[1]
            o = o[..., fy : fy + r.shape[-2], fx : fx + r.shape[-1]]
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
        passed, err, scale, where = _compare(o, r, atol, rtol, slack=slack)
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


class _Witness:
    """Float64 twins of an encoder and its dense reference, built lazily on the first failed fp32
    comparison: a discrepancy no larger than the two sides' own fp32 rounding (their distance to the
    same computation in float64) is not a contract violation. Deep stacks of normalisations over a
    few active sites amplify rounding far beyond any fixed fp32 tolerance; the twins tell that apart
    from a real leak. The twins are deep copies: the model under test is never converted.
    """

    def __init__(self, enc: nn.Module, dense: nn.Module | None = None, enabled: bool = True) -> None:
        self.enc, self.dense, self.enabled = enc, dense, enabled
        self._twins: tuple[nn.Module, nn.Module | None] | None = None
        self.error: str | None = None

    def applies(self, x: torch.Tensor) -> bool:
        return self.enabled and self.error is None and x.is_floating_point() and x.dtype != torch.float64

    def twins(self) -> tuple[nn.Module, nn.Module | None]:
        if self._twins is None:
            with preserved_state(self.enc, self.dense):  # copy the state as the user left it
                enc64 = copy.deepcopy(self.enc).double()
                dense64 = copy.deepcopy(self.dense).double() if self.dense is not None else None
            self._twins = (enc64, dense64)
        return self._twins

    def rerun(self, fn: Callable[[nn.Module, nn.Module | None], tuple]) -> tuple | None:
        """``fn(enc64, dense64)`` under preserved state, or None (noting why) if fp64 cannot run."""
        try:
            enc64, dense64 = self.twins()
            with preserved_state(enc64, dense64):
                return fn(enc64, dense64)
        except Exception as e:  # e.g. an op without a float64 kernel: keep the fp32 verdict
            self.error = f"{type(e).__name__}: {e}"
            return None


def _resolve_witness(fp64_witness: bool | _Witness, enc: nn.Module, dense: nn.Module | None) -> _Witness | None:
    if isinstance(fp64_witness, _Witness):
        return fp64_witness
    return _Witness(enc, dense) if fp64_witness else None


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


def _garbage_like(x: torch.Tensor, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Random values of the same rough magnitude as ``x`` (so that leaks are visible)."""
    std = float(x.float().std()) if x.numel() > 1 else 1.0
    std = std if std > 0 and std == std else 1.0
    g = torch.randn(*shape, generator=generator, dtype=torch.float32) * (3.0 * std) + 1.0
    return g.to(device=x.device, dtype=x.dtype)


# ----------------------------------------------------------------------------------------------------
# The checks (return CheckResult) and their assert_* forms
# ----------------------------------------------------------------------------------------------------


def check_zero_at_masked(
    enc: nn.Module, x: torch.Tensor, mask: torch.Tensor, *, train: bool = True, eval: bool = True
) -> list[CheckResult]:
    """Every feature ``enc(x, mask)`` returns must be exactly 0 at masked sites."""
    size = (x.shape[-2], x.shape[-1])
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
            hidden = ~_mask_at(mask, tuple(f.shape[-2:]))
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
            ref = _forward(enc, x, mask, train=mode)
        with preserved_state(enc):
            out = _forward(enc, big, big_mask, train=mode)

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
            ref64 = _forward(enc64, x.double(), mask, train=mode)
            return _forward(enc64, big.double(), big_mask, train=mode), ref64

        results.append(_with_witness(compare(), witness, x, fp64, compare))
    return results


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
    size = (x.shape[-2], x.shape[-1])
    witness = _resolve_witness(fp64_witness, enc, None)
    results = []
    for mode in _modes(train, eval):
        with preserved_state(enc):
            ref = _forward(enc, x, mask, train=mode)
        with preserved_state(enc):
            out = _forward(enc, xx, mm, train=mode)

        def compare(out64=None, ref64=None, out=out, ref=ref, mode=mode):
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
            )

        def fp64(enc64, _dense64, mode=mode):
            ref64 = _forward(enc64, x.double(), mask, train=mode)
            return _forward(enc64, xx.double(), mm, train=mode), ref64

        results.append(_with_witness(compare(), witness, x, fp64, compare))
    return results


def check_shares_parameters(enc: nn.Module, model: nn.Module) -> CheckResult:
    """Every parameter and buffer of ``enc`` must be the very object ``model`` holds under the same
    state_dict name (so training the encoder trains the model)."""
    model_sd = model.state_dict(keep_vars=True)
    enc_sd = enc.state_dict(keep_vars=True)
    problems = []
    for name, t in enc_sd.items():
        if name not in model_sd:
            problems.append(f"{name!r} is not a state_dict entry of the model")
        elif model_sd[name] is not t:
            problems.append(f"{name!r} is a different tensor object from the model's")
    if not enc_sd:
        params = {id(p) for p in model.parameters()}
        if params and not any(id(p) in params for p in enc.parameters()):
            problems.append("the encoder holds none of the model's parameters")
    detail = "\n".join(problems[:10]) + (f"\n... and {len(problems) - 10} more" if len(problems) > 10 else "")
    return CheckResult(
        "parameters shared with the model",
        "",
        not problems,
        float(len(problems)),
        1.0,
        "0 mismatches",
        detail,
    )


def _model_fingerprint(model: nn.Module) -> tuple:
    structure = tuple((name, type(m)) for name, m in model.named_modules())
    tensors = {k: (id(v), v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}
    flags = tuple(m.training for m in model.modules())
    return structure, tensors, flags


def check_model_untouched(model: nn.Module, before: tuple, x: torch.Tensor, out_before) -> CheckResult:
    """Compare ``model`` with a fingerprint taken before wrapping (see ``_model_fingerprint``)."""
    structure, tensors, flags = before
    s2, t2, f2 = _model_fingerprint(model)
    problems = []
    if structure != s2:
        problems.append("the module tree changed (submodules added, removed or replaced)")
    if flags != f2:
        problems.append("train/eval flags of some submodules changed")
    if tensors.keys() != t2.keys():
        problems.append(f"state_dict keys changed: {sorted(set(tensors) ^ set(t2))[:5]}")
    for k in tensors.keys() & t2.keys():
        if tensors[k][0] != t2[k][0]:
            problems.append(f"{k!r} was replaced by a different tensor object")
        elif not torch.equal(tensors[k][1], t2[k][1]):
            problems.append(f"{k!r} changed value")
    with preserved_state(model):
        out_after = _forward(model, x, train=False)
    if len(out_after) != len(out_before) or any(
        a.shape != b.shape or not torch.equal(a, b) for a, b in zip(out_after, out_before)
    ):
        problems.append("the model's own forward output changed")
    return CheckResult("model untouched", "", not problems, float(len(problems)), 1.0, "", "\n".join(problems[:10]))


def assert_zero_at_masked(
    enc: nn.Module, x: torch.Tensor, mask: torch.Tensor, *, train: bool = True, eval: bool = True
) -> None:
    """Assert every feature of ``enc(x, mask)`` is exactly 0 at masked sites (both modes by default)."""
    _raise_if_failed(check_zero_at_masked(enc, x, mask, train=train, eval=eval), "zero at masked sites:")


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


def assert_shares_parameters(enc: nn.Module, model: nn.Module) -> None:
    """Assert the encoder uses ``model``'s own parameter and buffer objects under the same names."""
    _raise_if_failed([check_shares_parameters(enc, model)], "parameter sharing:")


# ----------------------------------------------------------------------------------------------------
# The whole contract
# ----------------------------------------------------------------------------------------------------


def _is_encoder(obj: nn.Module) -> bool:
    return hasattr(obj, "dense_encoder") and hasattr(obj, "downsample_ratio")


def _describe(enc: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> str:
    strides = getattr(enc, "feature_strides", "?")
    chans = getattr(enc, "feature_channels", "?")
    vis = mask.flatten(1).sum(1).tolist()
    return (
        f"{type(enc).__name__}: R={getattr(enc, 'downsample_ratio', '?')}, strides {strides}, "
        f"channels {chans}; input {tuple(x.shape)} {x.dtype}, mask grid {tuple(mask.shape[-2:])}, "
        f"visible patches per sample {vis}"
    )


def run_contract_checks(
    module_or_encoder: nn.Module,
    x: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    input_size: tuple[int, int] | None = None,
    batch: int = 2,
    ratio: float = 0.5,
    atol: float = ATOL,
    rtol: float = RTOL,
    dense_atol: float = DENSE_ATOL,
    dense_rtol: float = DENSE_RTOL,
    train: bool = True,
    eval: bool = True,
    generator: torch.Generator | None = None,
    canvas_pads: Sequence[Sequence[int]] = ((1, 2), (2, 1, 0, 0)),
    wrap_kwargs: dict | None = None,
    fp64_witness: bool = True,
) -> tuple[list[CheckResult], str]:
    """Run every contract check; returns the results and a one-line description of the case.

    Same arguments as :func:`assert_sparse_semantics`, which raises instead.
    """
    import sparsify

    g = generator if generator is not None else torch.Generator().manual_seed(0)
    model = None if _is_encoder(module_or_encoder) else module_or_encoder
    if x is not None and input_size is None:
        input_size = (int(x.shape[-2]), int(x.shape[-1]))
    if model is not None:
        if input_size is None:
            raise ValueError("pass x or input_size to wrap a plain module")
        fingerprint = _model_fingerprint(model)
        enc = sparsify.wrap(model, input_size=tuple(input_size), **(wrap_kwargs or {}))
    else:
        enc = module_or_encoder
        if input_size is None:
            input_size = getattr(enc, "input_size", None)
            if input_size is None:
                raise ValueError("pass x or input_size (the encoder does not record its input size)")
    r = int(enc.downsample_ratio)
    if x is None:
        device = next((p.device for p in enc.parameters()), torch.device("cpu"))
        chans = int(getattr(enc, "in_chans", 3))
        x = torch.randn(batch, chans, *input_size, generator=g).to(device)
    grid = (x.shape[-2] // r, x.shape[-1] // r)
    if mask is None:
        mask = sparsify.random_mask(x.shape[0], grid, ratio, generator=g).to(x.device)
    mask = mask.bool()

    results: list[CheckResult] = []
    if model is not None:
        with preserved_state(model):
            out_before = _forward(model, x, train=False)
    dense = enc.dense_encoder()
    witness = _Witness(enc, dense, enabled=fp64_witness)
    results += check_zero_at_masked(enc, x, mask, train=train, eval=eval)
    results += check_dense_equal(
        enc,
        x,
        atol=dense_atol,
        rtol=dense_rtol,
        train=train,
        eval=eval,
        dense=dense,
        fp64_witness=witness,
    )
    for pad in canvas_pads:
        results += check_canvas_invariant(
            enc, x, mask, pad=pad, atol=atol, rtol=rtol, train=train, eval=eval, generator=g, fp64_witness=witness
        )
    results += check_masked_samples_invisible(
        enc, x, mask, atol=atol, rtol=rtol, train=train, eval=eval, generator=g, fp64_witness=witness
    )
    if model is not None:
        results.append(check_shares_parameters(enc, model))
        results.append(check_model_untouched(model, fingerprint, x, out_before))
    return results, _describe(enc, x, mask)


def assert_sparse_semantics(
    module_or_encoder: nn.Module,
    x: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    input_size: tuple[int, int] | None = None,
    batch: int = 2,
    ratio: float = 0.5,
    atol: float = ATOL,
    rtol: float = RTOL,
    dense_atol: float = DENSE_ATOL,
    dense_rtol: float = DENSE_RTOL,
    train: bool = True,
    eval: bool = True,
    generator: torch.Generator | None = None,
    canvas_pads: Sequence[Sequence[int]] = ((1, 2), (2, 1, 0, 0)),
    wrap_kwargs: dict | None = None,
    fp64_witness: bool = True,
) -> list[CheckResult]:
    """Assert the whole sparse-encoder contract for a module or an already wrapped encoder.

    Args:
        module_or_encoder: a plain ``nn.Module`` (wrapped here with ``sparsify.wrap``, and then also
            checked for parameter sharing and for being left untouched) or an encoder returned by
            ``sparsify.wrap``.
        x: input batch; random ``(batch, in_chans, *input_size)`` when None.
        mask: bool ``(B, 1, H // R, W // R)``, True = visible; a random mask with ``ratio`` masked
            when None (note: here None means *draw one*, not "all visible").
        input_size: ``(H, W)`` used for wrapping and for drawing ``x``; defaults to ``x``'s size (or
            the encoder's recorded ``input_size``).
        atol, rtol: tolerances of the masked comparisons (canvas invariance, invisible samples),
            relative to the feature scale ``max(1, max |reference|)``.
        dense_atol, dense_rtol: tolerances of dense equality.
        train, eval: which modes to check.
        generator: RNG for the random input, mask and garbage fills.
        canvas_pads: the canvas-invariance paddings to check, in patches, each ``(bottom, right)`` or
            ``(top, left, bottom, right)``; by default the contract's bottom/right padding and a
            top/left one (see :func:`check_canvas_invariant`).
        wrap_kwargs: extra arguments for ``sparsify.wrap`` (e.g. ``stages=[...]``).
        fp64_witness: when an fp32 comparison fails, rerun both sides on float64 deep copies and
            allow each side's own rounding error (its distance to its fp64 twin) on top of the
            tolerance. Normalisations over a few active sites amplify fp32 rounding far beyond any
            fixed tolerance; this separates that from real contract violations (a leak shows up in
            fp64 too). The model itself is never converted.

    Returns:
        The list of :class:`CheckResult` (all passed).

    Raises:
        AssertionError: listing every check, its mode, its max error and where it failed.

    Every buffer (BatchNorm running statistics), train/eval flag and the global RNG state are
    restored afterwards.
    """
    results, description = run_contract_checks(
        module_or_encoder,
        x,
        mask,
        input_size=input_size,
        batch=batch,
        ratio=ratio,
        atol=atol,
        rtol=rtol,
        dense_atol=dense_atol,
        dense_rtol=dense_rtol,
        train=train,
        eval=eval,
        generator=generator,
        canvas_pads=canvas_pads,
        wrap_kwargs=wrap_kwargs,
        fp64_witness=fp64_witness,
    )
    _raise_if_failed(results, f"sparse-semantics contract violated for {description}")
    return results


# ----------------------------------------------------------------------------------------------------
# Adapter references
# ----------------------------------------------------------------------------------------------------


def gather_active(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The feature vectors at active sites of an NCHW ``x``, as rows ``(N_active, C)`` in (b, y, x) order.

    ``mask`` is (B, 1, h, w) bool at any resolution that divides ``x``'s (resized by repetition).
    Uses boolean indexing: for references in tests only, never in a forward pass.
    """
    m = _mask_at(mask, tuple(x.shape[-2:]))[:, 0]
    return x.permute(0, 2, 3, 1)[m]


def scatter_active(rows: torch.Tensor, mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`gather_active`: an NCHW tensor of ``shape`` holding ``rows`` at active sites
    and 0 elsewhere."""
    b, c, h, w = shape
    m = _mask_at(mask, (h, w))[:, 0]
    out = rows.new_zeros(b, h, w, rows.shape[-1])
    out[m] = rows
    return out.permute(0, 3, 1, 2).contiguous()


def reference_batch_norm(
    bn: nn.modules.batchnorm._BatchNorm,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Gather-based reference for a masked BatchNorm: ``BatchNorm1d`` over the active feature vectors.

    The returned function runs on a deep copy of ``bn`` (so its running statistics are not touched)
    in ``bn``'s current train/eval mode.
    """

    def ref(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        clone = copy.deepcopy(bn)
        rows = gather_active(x, mask)
        out = F.batch_norm(
            rows,
            clone.running_mean,
            clone.running_var,
            clone.weight,
            clone.bias,
            training=bn.training or clone.running_mean is None,
            momentum=0.0 if clone.momentum is None else clone.momentum,
            eps=clone.eps,
        )
        return scatter_active(out, mask, x.shape)

    return ref


def reference_group_norm(gn: nn.GroupNorm) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Gather-based reference for a masked GroupNorm: per sample, statistics over the active sites of
    each channel group."""

    def ref(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        m = _mask_at(mask, tuple(x.shape[-2:]))[:, 0]
        for b in range(x.shape[0]):
            rows = x[b].permute(1, 2, 0)[m[b]]  # (n_b, C)
            if rows.shape[0] == 0:
                continue
            y = F.group_norm(rows.t().unsqueeze(0), gn.num_groups, gn.weight, gn.bias, gn.eps)  # (1, C, n_b)
            out[b].permute(1, 2, 0)[m[b]] = y[0].t()
        return out

    return ref


def assert_matches_reference(
    masked_out: torch.Tensor | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    reference_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    zero_at_masked: bool = True,
) -> CheckResult:
    """Assert an adapter's output equals a gather-based reference at active sites.

    Args:
        masked_out: the adapter's output (B, C', h', w'), or a callable ``f(x, mask)`` producing it.
        reference_fn: ``reference_fn(x, mask_px)`` returning the expected output (same shape), where
            ``mask_px`` is the mask resized to ``x``'s spatial size; only its values at active sites
            of the output are compared. :func:`gather_active` / :func:`scatter_active` make it easy
            to write (e.g. :func:`reference_batch_norm`).
        x: the input (B, C, h, w).
        mask: bool (B, 1, h_m, w_m), True = visible, at any resolution dividing ``x``'s.
        zero_at_masked: also require the adapter's output to be exactly 0 at masked sites.

    Returns:
        the passing :class:`CheckResult`.
    """
    mask_px = _mask_at(mask, tuple(x.shape[-2:]))
    out = masked_out(x, mask) if callable(masked_out) else masked_out
    with torch.no_grad():
        ref = reference_fn(x, mask_px)
    if out.shape != ref.shape:
        raise AssertionError(f"adapter output shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    active = _mask_at(mask, tuple(out.shape[-2:])) if out.dim() == 4 else None
    passed, err, scale, where = _compare(out, ref, atol, rtol, where=active)
    detail = where
    if passed and zero_at_masked and active is not None:
        leak = torch.where(active, 0.0, out.detach().double().abs())
        if float(leak.max()) != 0.0:
            passed = False
            idx = int(leak.flatten().argmax())
            detail = f"nonzero value {float(leak.max()):.3g} at masked site {_locate(idx, leak.shape)}"
    result = CheckResult(
        "adapter matches gather reference", "", passed, err, scale, f"{atol:g}*scale + {rtol:g}*|ref|", detail
    )
    _raise_if_failed([result], "adapter vs reference:")
    return result
