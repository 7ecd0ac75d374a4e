"""Mask-aware layer adapters and the registry that maps graph operations to them.

One concept per file: ``conv``, ``batch_norm``, ``group_norm``, ``instance_norm``, ``layer_norm``,
``pool``, ``reduce``, ``interpolate``, ``pad``, ``pointwise`` (activations and arithmetic),
``elementwise`` (the rest of torch's elementwise operators), ``shape`` (layout operations),
``space_to_depth`` (space<->depth written as view/permute/reshape or einops), ``pooled`` (batch
statistics over pooled vectors) and ``evo_norm`` (timm's EvoNorm-B0); the private ``_flat`` follows
positions flattened into one axis (attention pooling, group statistics). Importing this package
registers every built-in rule.
"""

from . import (  # noqa: F401  (imported for their registrations)
    batch_norm,
    conv,
    elementwise,
    evo_norm,
    group_norm,
    instance_norm,
    interpolate,
    layer_norm,
    pad,
    pointwise,
    pool,
    pooled,
    reduce,
    shape,
    space_to_depth,  # after shape: it wraps the layout rules
)
from ._registry import Decision, Info, NodeView, Unsupported, find_rule, register_rule
from ._stats import apply_mask, masked_moments, masked_sums
from .batch_norm import masked_batch_norm, masked_batch_norm_fn
from .group_norm import masked_group_norm, masked_group_norm_fn
from .instance_norm import masked_instance_norm, masked_instance_norm_fn
from .layer_norm import masked_layer_norm, masked_layer_norm_fn
from .pool import masked_average, masked_max
from .reduce import masked_mean, masked_reduce
from .register import register_adapter

__all__ = [
    "Decision", "Info", "NodeView", "Unsupported", "find_rule", "register_rule", "apply_mask",
    "masked_moments", "masked_sums", "masked_batch_norm", "masked_batch_norm_fn", "masked_group_norm",
    "masked_group_norm_fn", "masked_instance_norm", "masked_instance_norm_fn", "masked_layer_norm",
    "masked_layer_norm_fn", "masked_average", "masked_max", "masked_mean", "masked_reduce", "register_adapter",
]
