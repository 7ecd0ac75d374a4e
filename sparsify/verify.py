"""``sparsify.verify(enc)``: run the sparse-encoder contract checks on random data.

Checks (design.md section 2), each in train and eval mode, at the encoder's traced input size and at
a non-square variant of it: zero at masked sites; dense equality with nothing masked (``mask=None``
and an all-visible mask) against the unmodified model's own module outputs (captured with forward
hooks; ``enc.dense_encoder()`` for stages no single module returns); canvas invariance (padding
with whole masked patches of garbage); fully masked samples invisible to the others; the encoder
shares the model's parameter and buffer objects under the same names.

Stochastic layers (dropout, drop path, drop block) stay in train mode, but every comparison between
runs on differently shaped inputs holds their random draws at the most likely value
(:func:`sparsify.testing.fixed_draws`): their draws depend on the shape, not on the contract.
Zero at masked sites is checked with real draws.

Float32 encoders are compared in float32 first; a failed comparison is decided in float64 on deep
copies (see ``fp64_witness``), or, where no float64 copy can run, with a tolerance that grows with
the square root of the network's depth. Float64 encoders are held to the fixed tolerances.

All failures are collected into one :class:`~sparsify.SparsifyError` whose message lists every
check with its max error; on success a :class:`VerifyReport` is returned. The encoder's buffers
(BatchNorm running statistics), train/eval flags and the global RNG state are left as they were.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .errors import SparsifyError
from .testing._contract import run_contract_checks
from .testing._geometry import ratio_of
from .testing._results import ATOL, DENSE_ATOL, DENSE_RTOL, RTOL, CheckResult, format_results
from .testing._sharing import check_shares_parameters
from .testing._state import preserved_state

__all__ = ["VerifyReport", "verify"]


@dataclass
class VerifyReport:
    """What :func:`verify` checked.

    Attributes:
        results: every :class:`~sparsify.testing.CheckResult`, labelled with the input size used.
        sizes: the input sizes checked.
    """

    results: list[CheckResult] = field(default_factory=list)
    sizes: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every check held."""
        return all(r.passed for r in self.results)

    @property
    def max_errors(self) -> dict[str, float]:
        """Worst error per check (over sizes and modes), keyed by check name."""
        out: dict[str, float] = {}
        for r in self.results:
            out[r.name] = max(out.get(r.name, 0.0), r.max_error)
        return out

    def __str__(self) -> str:
        sizes = ", ".join("x".join(str(s) for s in size) for size in self.sizes)
        return format_results(self.results, f"sparsify.verify at input sizes {sizes}:")


def _variant(size: tuple[int, ...], r: tuple[int, ...]) -> tuple[int, ...]:
    """A non-square companion of ``size`` (a multiple of R on every axis): an image's sides swapped
    (one more patch column when square); in other ranks, or with per-axis strides, one more block of
    R on the last axis."""
    if len(size) == 2 and r[0] == r[1]:
        h, w = size
        return (h, w + r[1]) if h == w else (w, h)
    return (*size[:-1], size[-1] + r[-1])


def _model_cannot_run(enc: nn.Module, model: nn.Module | None, x: torch.Tensor) -> str | None:
    """Why the unmodified network itself fails on ``x`` (train or eval mode), or None if it runs.

    A crash inside the checks is a contract failure only when the dense network runs: a train-mode
    BatchNorm over a 1x1 map (an image-pool branch) cannot normalise a batch of one sample, with or
    without sparsify, and that is a property of the input, not of the encoder.
    """
    net = model if model is not None else enc.dense_encoder()
    kwargs = dict(getattr(enc, "_forward_kwargs", None) or {}) if model is not None else {}
    for mode in (True, False):
        try:
            with preserved_state(net), torch.no_grad():
                net.train(mode)
                net(x, **kwargs)
        except Exception as e:  # the user's own network: any error it raises is the answer
            return f"{type(e).__name__} in {'train' if mode else 'eval'} mode: {e}"
    return None


def verify(
    enc: nn.Module,
    *,
    batch: int = 2,
    input_size: tuple[int, ...] | None = None,
    ratio: float = 0.6,
    seed: int = 0,
    model: nn.Module | None = None,
    atol: float = ATOL,
    rtol: float = RTOL,
    dense_atol: float = DENSE_ATOL,
    dense_rtol: float = DENSE_RTOL,
    fp64_witness: bool = True,
) -> VerifyReport:
    """Run the contract checks on random inputs and masks; raise one SparsifyError listing all failures.

    Args:
        enc: an encoder returned by :func:`sparsify.wrap`.
        batch: samples per random batch (at least 2 when a train-mode BatchNorm sees a 1x1 map, as
            in an image-pool branch: the model itself cannot normalise one value per channel).
        input_size: ``(H, W)`` (``(D, H, W)`` for volumes, ``(L,)`` for signals), multiples of R;
            defaults to the size the encoder was traced with. A variant (one more patch column, or H
            and W swapped; one more patch on the last axis in other ranks) is checked as well.
        ratio: fraction of patches masked.
        seed: seed of the random inputs, masks and garbage fills.
        model: the wrapped model (default: the one ``sparsify.wrap`` made the encoder from): the
            ground truth for dense equality, and parameter sharing is checked against it.
        atol, rtol, dense_atol, dense_rtol: tolerances relative to the feature scale.
        fp64_witness: decide a failed fp32 comparison in float64 (on deep copies of the encoder and
            the model): fp32 rounding of deep networks over a few visible sites (1e-3 of the scale
            on a 22-block pre-activation network in train mode) is not reported, a leak is. Where no
            float64 copy can run, the tolerance grows with depth instead
            (:func:`sparsify.testing.rounding_allowance`). False: the fixed tolerances alone.

    Returns:
        A :class:`VerifyReport` with every check's max error.

    Raises:
        SparsifyError: if any check fails; the message lists every check, its mode, input size and
            max error, and where the worst error occurred.
    """
    rank = int(getattr(enc, "spatial_dims", 2))
    r = ratio_of(enc, rank)
    if input_size is None:
        input_size = getattr(enc, "input_size", None)
    if input_size is None:
        input_size = tuple(2 * k for k in r)
    if isinstance(input_size, int):
        input_size = (input_size,) * rank
    input_size = tuple(int(s) for s in input_size)
    if len(input_size) != rank or any(s % k for s, k in zip(input_size, r)):
        shown = r[0] if len(set(r)) == 1 else r
        raise SparsifyError(
            f"verify: input_size {input_size} must be a multiple of the downsample ratio {shown} on "
            + ("both sides" if rank == 2 else f"each of the {rank} spatial axes")
        )
    sizes = [input_size, _variant(input_size, r)]
    device = next((p.device for p in enc.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in enc.parameters() if p.is_floating_point()), torch.float32)
    chans = int(getattr(enc, "in_chans", 3))
    report = VerifyReport(sizes=sizes)
    for size in sizes:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, chans, *size, generator=g).to(device=device, dtype=dtype)
        where = "x".join(str(s) for s in size)
        try:
            results, _ = run_contract_checks(
                enc,
                x,
                None,
                ratio=ratio,
                atol=atol,
                rtol=rtol,
                dense_atol=dense_atol,
                dense_rtol=dense_rtol,
                generator=g,
                fp64_witness=fp64_witness,
                source_model=model,
            )
        except Exception as e:  # a crash is a failed check, reported with the others
            own = _model_cannot_run(enc, model if model is not None else getattr(enc, "source_model", None), x)
            if own is not None and own.startswith(type(e).__name__):
                hint = (
                    " A BatchNorm in train mode needs more than one value per channel: with a 1x1 map (an "
                    "image-pool branch, a squeeze before a norm) that means batch >= 2; call verify(enc, "
                    "batch=2) or more."
                    if "more than 1 value per channel" in own
                    else " Choose a batch and input size the model accepts."
                )
                raise SparsifyError(
                    f"verify: the unmodified model itself cannot run a random batch of {batch} at input size "
                    f"{where} ({own}); this is not a contract violation of the encoder.{hint}"
                ) from e
            results = [CheckResult("runs without error", "", False, float("inf"), detail=f"{type(e).__name__}: {e}")]
        for res in results:
            res.context = where
        report.results += results
    if model is None:
        model = getattr(enc, "source_model", None)
    if model is not None:
        report.results.append(check_shares_parameters(enc, model))
    if not report.passed:
        raise SparsifyError(
            str(report)
            + "\nThe encoder breaks the sparse-encoder contract (design.md section 2). If a custom layer is "
            "involved, check its adapter with sparsify.testing.assert_sparse_semantics on a small module "
            "containing it."
        )
    return report
