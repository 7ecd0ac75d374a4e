"""The SparK optimiser: LAMB from timm's factory, betas by norm type, weight decay only where it belongs.

Design.md section 7: LAMB with betas (0.9, 0.95) for BatchNorm networks and (0.9, 0.999) for
LayerNorm networks, eps 1e-6, gradient-norm clip 5 (done by the training loop, so that it works with a
gradient scaler), and no weight decay on 1-D parameters, biases, mask tokens or layer scale.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = [
    "NO_DECAY_NAME_PARTS",
    "BETA_OPTIMIZERS",
    "betas_for_norm",
    "optimizer_betas",
    "param_groups",
    "create_optimizer",
    "set_lr_and_wd",
]

NO_DECAY_NAME_PARTS = ("mask_token", "gamma", "layer_scale", "ls1", "ls2", "ls.", "pos_embed", "cls_token")


#: timm optimisers that take Adam-style betas (the rest, such as sgd, are built without them)
BETA_OPTIMIZERS = ("lamb", "adamw", "adam", "lambc", "nlamb")


def betas_for_norm(norm_type: str | None) -> tuple[float, float]:
    """(0.9, 0.999) for LayerNorm networks, (0.9, 0.95) otherwise (BatchNorm, GroupNorm, none)."""
    return (0.9, 0.999) if norm_type == "layer" else (0.9, 0.95)


def optimizer_betas(opt: str, norm_type: str | None) -> tuple[float, float] | None:
    """The betas ``opt`` is built with, or None for an optimiser that takes none (sgd, ...)."""
    return betas_for_norm(norm_type) if opt in BETA_OPTIMIZERS else None


def _no_decay(name: str, param: torch.Tensor) -> bool:
    if param.ndim <= 1 or name.endswith(".bias") or name == "bias":
        return True
    leaf = name.lower()
    return any(part in leaf for part in NO_DECAY_NAME_PARTS)


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]] | nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: with weight decay, and without (1-D, biases, mask tokens, layer scale).

    Each group carries ``apply_wd`` so that :func:`set_lr_and_wd` can follow the decay schedule on the
    decaying group only. Frozen parameters are left out.
    """
    if isinstance(named_params, nn.Module):
        named_params = named_params.named_parameters()
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    for name, p in named_params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if _no_decay(name, p) else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "apply_wd": True})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "apply_wd": False})
    return groups


def create_optimizer(
    groups: list[dict],
    lr: float,
    weight_decay: float,
    norm_type: str | None = "batch",
    opt: str = "lamb",
    eps: float = 1e-6,
) -> torch.optim.Optimizer:
    """Build the optimiser through ``timm.optim.create_optimizer_v2`` (LAMB by default).

    Gradient clipping is left to the caller (``max_grad_norm=None`` for LAMB), so that it runs after a
    gradient scaler's unscale step.
    """
    from timm.optim import create_optimizer_v2

    kwargs: dict = {"eps": eps}
    betas = optimizer_betas(opt, norm_type)
    if betas is not None:
        kwargs["betas"] = betas
    if opt in ("lamb", "lambc"):
        kwargs["max_grad_norm"] = None
    return create_optimizer_v2(groups, opt=opt, lr=lr, weight_decay=weight_decay, **kwargs)


def set_lr_and_wd(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """Set every group's learning rate, and the weight decay of the groups that decay."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = wd if group.get("apply_wd", True) else 0.0
