"""Gather-based references for one adapter: compute the statistic on the active sites gathered explicitly."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._compare import _compare
from ._geometry import _locate, _mask_at
from ._results import ATOL, RTOL, CheckResult, _raise_if_failed


def gather_active(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The feature vectors at active sites of an (N, C, *spatial) ``x`` (NCHW for images, NCDHW for
    volumes, NCL for signals), as rows ``(N_active, C)`` in (b, *spatial) order.

    ``mask`` is (B, 1, *grid) bool at any resolution that divides ``x``'s (resized by repetition).
    Uses boolean indexing: for references in tests only, never in a forward pass.
    """
    m = _mask_at(mask, tuple(x.shape[2:]))[:, 0]
    return x.movedim(1, -1)[m]


def scatter_active(rows: torch.Tensor, mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`gather_active`: an (N, C, *spatial) tensor of ``shape`` holding ``rows`` at
    active sites and 0 elsewhere."""
    b, spatial = shape[0], tuple(shape[2:])
    m = _mask_at(mask, spatial)[:, 0]
    out = rows.new_zeros(b, *spatial, rows.shape[-1])
    out[m] = rows
    return out.movedim(-1, 1).contiguous()


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
        return _per_sample(x, mask, lambda rows: F.group_norm(rows, gn.num_groups, gn.weight, gn.bias, gn.eps))

    return ref


def reference_instance_norm(norm: nn.modules.instancenorm._InstanceNorm
                            ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Gather-based reference for a masked InstanceNorm (any rank): per sample and channel, statistics
    over the active sites; in eval mode with running statistics, the module's own per-channel map.
    Runs on a deep copy (running statistics untouched)."""

    def ref(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        clone = copy.deepcopy(norm)
        use_input_stats = norm.training or not norm.track_running_stats
        return _per_sample(x, mask, lambda rows: F.instance_norm(
            rows, clone.running_mean, clone.running_var, clone.weight, clone.bias, use_input_stats,
            0.0, clone.eps))

    return ref


def _per_sample(x: torch.Tensor, mask: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` applied per sample to the (1, C, n_active) gathered active sites, scattered back (0 elsewhere)."""
    out = torch.zeros_like(x)
    m = _mask_at(mask, tuple(x.shape[2:]))[:, 0]
    for b in range(x.shape[0]):
        rows = x[b].movedim(0, -1)[m[b]]  # (n_b, C)
        if rows.shape[0] == 0:
            continue
        y = fn(rows.t().unsqueeze(0))  # (1, C, n_b)
        out[b].movedim(0, -1)[m[b]] = y[0].t()
    return out


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

    A callable ``masked_out`` receives the mask in the form the encoder hands an adapter: 0/1 floats
    ``(B, 1, h, w)`` at ``x``'s own resolution (see :func:`adapter_mask`), so an adapter registered with
    :func:`sparsify.register_adapter` is checked exactly as ``wrap`` will call it.

    Args:
        masked_out: the adapter's output (B, C', *spatial'), or a callable ``f(x, mask)`` producing it.
        reference_fn: ``reference_fn(x, mask_px)`` returning the expected output (same shape), where
            ``mask_px`` is the mask resized to ``x``'s spatial size; only its values at active sites
            of the output are compared. :func:`gather_active` / :func:`scatter_active` make it easy
            to write (e.g. :func:`reference_batch_norm`).
        x: the input (B, C, *spatial): (B, C, h, w) for images, (B, C, d, h, w), (B, C, l).
        mask: bool (B, 1, *grid), True = visible, at any resolution dividing ``x``'s.
        zero_at_masked: also require the adapter's output to be exactly 0 at masked sites.

    Returns:
        the passing :class:`CheckResult`.
    """
    mask_px = _mask_at(mask, tuple(x.shape[2:]))
    out = masked_out(x, adapter_mask(mask, x)) if callable(masked_out) else masked_out
    with torch.no_grad():
        ref = reference_fn(x, mask_px)
    if out.shape != ref.shape:
        raise AssertionError(f"adapter output shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    active = _mask_at(mask, tuple(out.shape[2:])) if out.dim() == x.dim() else None
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


def adapter_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The mask as the encoder passes it to an adapter whose input is ``x``: 0/1 floats, ``x``'s spatial size.

    ``mask`` is the patch mask (bool, True = visible, any resolution that divides ``x``'s); the result
    broadcasts against ``x`` (B, 1, h, w). This is the very function the rewritten graph calls.
    """
    from sparsify.rewrite import mask_like

    return mask_like(mask, x, tuple(range(2, x.dim())))
