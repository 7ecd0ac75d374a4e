"""The whole sparse-encoder contract (design.md section 2) in one call.

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

from collections.abc import Sequence

import torch
import torch.nn as nn

from ._batch import check_masked_samples_invisible
from ._canvas import check_canvas_invariant, default_canvas_pads
from ._dense import check_dense_equal
from ._dense import source_model as _source
from ._geometry import patch_of
from ._results import ATOL, DENSE_ATOL, DENSE_RTOL, RTOL, CheckResult, _raise_if_failed
from ._sharing import _model_fingerprint, check_model_untouched, check_shares_parameters
from ._state import _forward, preserved_state
from ._witness import _Witness
from ._zero import check_zero_at_masked


def _is_encoder(obj: nn.Module) -> bool:
    return hasattr(obj, "dense_encoder") and hasattr(obj, "downsample_ratio")


def _describe(enc: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> str:
    strides = getattr(enc, "feature_strides", "?")
    chans = getattr(enc, "feature_channels", "?")
    vis = mask.flatten(1).sum(1).tolist()
    return (
        f"{type(enc).__name__}: R={getattr(enc, 'downsample_ratio', '?')}, strides {strides}, "
        f"channels {chans}; input {tuple(x.shape)} {x.dtype}, mask grid {tuple(mask.shape[2:])}, "
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
    canvas_pads: Sequence[Sequence[int]] | None = None,
    wrap_kwargs: dict | None = None,
    fp64_witness: bool = True,
    source_model: nn.Module | None = None,
) -> tuple[list[CheckResult], str]:
    """Run every contract check; returns the results and a one-line description of the case.

    Same arguments as :func:`assert_sparse_semantics`, which raises instead. ``source_model``: for
    an encoder, the model it was made from (default: the one ``sparsify.wrap`` recorded), whose own
    module outputs are the dense-equality reference.
    """
    import sparsify

    g = generator if generator is not None else torch.Generator().manual_seed(0)
    model = None if _is_encoder(module_or_encoder) else module_or_encoder
    if x is not None and input_size is None:
        input_size = tuple(int(s) for s in x.shape[2:])
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
    if x is None:
        device = next((p.device for p in enc.parameters()), torch.device("cpu"))
        dtype = next((p.dtype for p in enc.parameters() if p.is_floating_point()), torch.float32)
        chans = int(getattr(enc, "in_chans", 3))
        x = torch.randn(batch, chans, *input_size, generator=g).to(device=device, dtype=dtype)
    rank = x.dim() - 2
    grid = tuple(n // p for n, p in zip(x.shape[2:], patch_of(enc, rank)))
    canvas_pads = default_canvas_pads(rank) if canvas_pads is None else canvas_pads
    if mask is None:
        mask = sparsify.random_mask(x.shape[0], grid, ratio, generator=g).to(x.device)
    mask = mask.bool()

    results: list[CheckResult] = []
    if model is not None:
        with preserved_state(model):
            out_before = _forward(model, x, train=False)
    dense = enc.dense_encoder()
    truth = model if model is not None else source_model if source_model is not None else _source(enc)
    witness = _Witness(enc, dense, enabled=fp64_witness, model=truth)
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
        model=truth,
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
    canvas_pads: Sequence[Sequence[int]] | None = None,
    wrap_kwargs: dict | None = None,
    fp64_witness: bool = True,
) -> list[CheckResult]:
    """Assert the whole sparse-encoder contract for a module or an already wrapped encoder.

    Args:
        module_or_encoder: a plain ``nn.Module`` (wrapped here with ``sparsify.wrap``, and then also
            checked for parameter sharing and for being left untouched) or an encoder returned by
            ``sparsify.wrap``.
        x: input batch; random ``(batch, in_chans, *input_size)`` when None.
        mask: bool ``(B, 1, *grid)`` (``(B, 1, H // R, W // R)`` for images), True = visible; a
            random mask with ``ratio`` masked when None (note: here None means *draw one*, not "all
            visible").
        input_size: ``(H, W)`` (``(D, H, W)``, ``(L,)``) used for wrapping and for drawing ``x``;
            defaults to ``x``'s size (or the encoder's recorded ``input_size``).
        atol, rtol: tolerances of the masked comparisons (canvas invariance, invisible samples),
            relative to the feature scale ``max(1, max |reference|)``.
        dense_atol, dense_rtol: tolerances of dense equality.
        train, eval: which modes to check.
        generator: RNG for the random input, mask and garbage fills.
        canvas_pads: the canvas-invariance paddings to check, in patches, each ``(bottom, right)`` or
            ``(top, left, bottom, right)`` (one count per axis, or starts then ends, in other ranks);
            by default the contract's bottom/right padding and a top/left one (see
            :func:`check_canvas_invariant`, :func:`default_canvas_pads`).
        wrap_kwargs: extra arguments for ``sparsify.wrap`` (e.g. ``stages=[...]``).
        fp64_witness: when an fp32 comparison fails, rerun both sides on float64 deep copies and
            allow each side's own rounding error (its distance to its fp64 twin) on top of the
            tolerance, i.e. decide in float64. Normalisations over a few active sites amplify fp32
            rounding far beyond any fixed tolerance (1e-3 of the scale on a 22-block
            pre-activation network in train mode); this separates that from real contract
            violations (a leak shows up in fp64 too). The model itself is never converted. Where
            no float64 copy can run (an op or device without float64), the tolerance grows with
            depth instead: :func:`rounding_allowance` (``ROUNDING_CONSTANT * eps * sqrt(layers)``
            of the scale). False: the fixed tolerances alone.

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
