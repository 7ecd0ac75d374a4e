"""Batch statistics over pooled per-sample vectors: fully masked samples are left out.

Squeeze-excitation and attention blocks, and ASPP's image-pool branch, sometimes normalise pooled
vectors ((B, C, 1, 1) after a global pool and a 1x1 conv, or (B, C) after flattening) with
BatchNorm. The pooled vector of a sample with no visible site is a placeholder, not data: in train
mode it must not enter the batch mean and variance (contract: appending a fully masked sample changes
nothing). These rules give such BatchNorms the masked BatchNorm with a per-sample mask (1 for a
sample with at least one active site). Feature-map BatchNorms keep their own rules (``batch_norm``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ._kinds import module_is_nonneg, passthrough_nonspatial
from ._registry import Decision, NodeView, Rule, Unsupported, register_rule, registered_rule
from .batch_norm import masked_batch_norm, masked_batch_norm_fn

__all__: list[str] = []


def _per_sample(spatial_rule: Rule | None, masked, nonneg=lambda view: False) -> Rule:
    def rule(view: NodeView) -> Decision:
        x = view.arg(0, "input")
        info = view.info(x)
        if info is not None and info.spatial is None and info.per_sample:
            out = info.but(nonneg=nonneg(view), varies=None)
            return Decision(out=out, masked=masked, mask_of=x, sample_mask=True)
        if spatial_rule is None:
            if info is not None and info.spatial is not None:
                raise Unsupported("a 1-D BatchNorm over a feature map")
            return passthrough_nonspatial(view)
        return spatial_rule(view)

    return rule


def _register() -> None:
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LazyBatchNorm1d,
                nn.LazyBatchNorm2d, nn.LazyBatchNorm3d):
        register_rule(cls, _per_sample(registered_rule(cls), masked_batch_norm))
    register_rule(F.batch_norm, _per_sample(registered_rule(F.batch_norm), masked_batch_norm_fn))
    try:
        from timm.layers import norm_act
    except ImportError:
        return
    for name in ("BatchNormAct2d", "SyncBatchNormAct"):
        cls = getattr(norm_act, name, None)
        if cls is not None:
            register_rule(cls, _per_sample(registered_rule(cls), masked_batch_norm,
                                           lambda v: module_is_nonneg(getattr(v.module, "act", None))))


_register()
