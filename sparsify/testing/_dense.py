"""Check: with nothing masked the encoder equals the dense network."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._compare import _compare_features
from ._draws import fixed_draws
from ._geometry import patch_of
from ._hooks import capture_module_outputs
from ._results import DENSE_ATOL, DENSE_RTOL, CheckResult, _raise_if_failed
from ._state import _forward, _mode_name, _modes, preserved_state
from ._witness import _resolve_witness, _with_witness, _Witness


def source_model(enc: nn.Module) -> nn.Module | None:
    """The model an encoder was made from, when it knows (``sparsify.wrap`` records it)."""
    return getattr(enc, "source_model", None)


def _reference(
    enc: nn.Module, dense: nn.Module, model: nn.Module | None, x: torch.Tensor, mode: bool
) -> tuple[list[torch.Tensor], int]:
    """The dense reference features and how many of them are the model's own module outputs.

    Where the encoder knows which module of the model returns a stage (``enc._stage_modules``), the
    reference is that module's output in the unmodified model, captured with a forward hook: it does
    not share the encoder's tracing, so a value frozen at trace time or a stale copy shows. Other
    stages fall back to ``dense`` (the traced network cut at the stages).
    """
    with preserved_state(enc, dense):
        refs = _forward(dense, x, train=mode, fixed=True)
    names = list(getattr(enc, "_stage_modules", None) or [])
    wanted = [n for n in names if n is not None]
    if model is None or not wanted or len(names) != len(refs):
        return refs, 0
    with fixed_draws():
        got = capture_module_outputs(
            model, x, wanted, train=mode, seed=0, stop_early=True, kwargs=getattr(enc, "_forward_kwargs", None)
        )
    used = 0
    for i, name in enumerate(names):
        if name is not None and isinstance(got[name], torch.Tensor):
            refs[i], used = got[name], used + 1
    return refs, used


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
    model: nn.Module | None = None,
) -> list[CheckResult]:
    """``enc(x, None)`` and ``enc(x, all-True mask)`` must equal the unmodified network.

    The reference is the model's own module outputs, captured with forward hooks, for every stage
    the encoder can name a module for (``model`` defaults to the model ``sparsify.wrap`` made the
    encoder from), and ``enc.dense_encoder()(x)`` for the others. Random draws (dropout, drop path)
    are held at their most likely values on both sides. Both comparisons are held to ``atol`` /
    ``rtol``. With ``fp64_witness`` a failed fp32 comparison is re-judged allowing each side's own
    rounding error (its distance to a float64 twin).
    """
    dense = enc.dense_encoder() if dense is None else dense
    model = source_model(enc) if model is None else model
    witness = _resolve_witness(fp64_witness, enc, dense, model)
    size = tuple(x.shape[2:])
    grid = tuple(n // p for n, p in zip(size, patch_of(enc, len(size))))
    full = torch.ones(x.shape[0], 1, *grid, dtype=torch.bool, device=x.device)
    results = []
    for mode in _modes(train, eval):
        ref, from_model = _reference(enc, dense, model, x, mode)
        for label, m in (("mask=None", None), ("all-visible mask", full)):
            with preserved_state(enc, dense):
                out = _forward(enc, x, m, train=mode, fixed=True)
            name = f"dense equality ({label})"
            if from_model:
                name += f" vs the model's own outputs at {from_model} of {len(ref)} stages"
            result = _compare_features(enc, name, _mode_name(mode), out, ref, atol, rtol, ref_size=size)

            def fp64(enc64, dense64, m=m, mode=mode, from_model=from_model):
                x64 = x.double()
                ref64, _ = _reference(enc64, dense64, witness.model64 if from_model else None, x64, mode)
                return _forward(enc64, x64, m, train=mode, fixed=True), ref64

            def compare(out64, ref64, out=out, ref=ref, name=name, mode=mode, extra_atol=0.0):
                return _compare_features(
                    enc, name, _mode_name(mode), out, ref, atol, rtol, ref_size=size, outs64=out64, refs64=ref64,
                    extra_atol=extra_atol,
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
