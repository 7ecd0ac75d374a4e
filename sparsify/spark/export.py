"""Export the pretrained backbone: the user's model weights under their original state_dict names.

``export_backbone(enc_or_spark, "backbone.safetensors")`` writes the encoder's state_dict, which is the
user's model's state_dict minus the head that ``sparsify.wrap`` cut away. Load it into a fresh model of
the same architecture with ``model.load_state_dict(load_backbone(path), strict=False)``: the only
missing keys are the head's (torchvision models included). With timm, for a new classifier::

    timm.create_model(name, pretrained=True, num_classes=10, in_chans=...,
                      pretrained_cfg_overlay=dict(file="backbone.safetensors"))

(timm drops the classifier and loads the rest non-strictly only when ``num_classes`` differs from the
pretrained config's, 1000 for ImageNet models; use ``num_classes=0`` for a headless feature extractor.)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import SparsifyError

__all__ = ["export_backbone", "load_backbone", "backbone_state_dict"]

_SAFETENSORS = (".safetensors",)
_TORCH = (".pth", ".pt", ".bin")


def backbone_state_dict(enc_or_spark: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone weights of a SparK (its encoder's) or of an encoder, as detached CPU tensors."""
    from .model import SparK

    module = getattr(enc_or_spark, "_orig_mod", enc_or_spark)  # unwrap torch.compile
    if isinstance(module, SparK):
        module = module.encoder
    if not isinstance(module, nn.Module):
        raise SparsifyError(
            "export_backbone needs a SparK or a sparse encoder from sparsify.wrap, "
            f"got {type(module).__name__}"
        )
    state = module.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue  # extra state (not a weight)
        out[name] = value.detach().cpu().clone().contiguous()
    if not out:
        raise SparsifyError(f"{type(module).__name__} has no weights to export")
    return out


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _SAFETENSORS + _TORCH:
        raise SparsifyError(
            f"cannot tell the checkpoint format from {str(path)!r}; use a .safetensors, .pth or .pt file name"
        )
    return suffix


def export_backbone(enc_or_spark: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write the pretrained backbone weights (original names, no head, no SparK decoder) to ``path``.

    The format follows the suffix: ``.safetensors`` (recommended) or ``.pth``/``.pt`` (``torch.save``
    of a plain state_dict). Parent folders are created. Returns the written path.
    """
    path = Path(path)
    suffix = _suffix(path)
    state = backbone_state_dict(enc_or_spark)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in _SAFETENSORS:
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"format": "pt", "producer": "sparsify"})
    else:
        torch.save(state, path)
    return path


def load_backbone(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state_dict written by :func:`export_backbone`.

    ``.safetensors`` files are read with safetensors, ``.pth``/``.pt`` with
    ``torch.load(weights_only=True)``; tensors land on the CPU.
    """
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise SparsifyError(f"checkpoint {str(path)!r} does not exist")
    if suffix in _SAFETENSORS:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SparsifyError(f"{str(path)!r} does not hold a plain state_dict of tensors")
    return state
