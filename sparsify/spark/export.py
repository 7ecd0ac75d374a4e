"""Export the pretrained backbone: the user's model weights under their original state_dict names.

``export_backbone(enc_or_spark, "backbone.safetensors")`` writes the encoder's state_dict, which is the
user's model's state_dict minus the head that ``sparsify.wrap`` cut away. Load it into a fresh model of
the same architecture with ``model.load_state_dict(load_backbone(path), strict=False)``: the only
missing keys are the head's (torchvision models included). With timm, for a new classifier::

    timm.create_model(name, pretrained=True, num_classes=10, in_chans=...,
                      pretrained_cfg_overlay=dict(file="backbone.safetensors"))

(timm drops the classifier and loads the rest non-strictly only when ``num_classes`` differs from the
pretrained config's, 1000 for ImageNet models; use ``num_classes=0`` for a headless feature extractor.)

A ``.safetensors`` export also describes where it came from, in the file's header metadata (strings,
read back by :func:`backbone_metadata`): ``sparsify.model`` (the model spec, when the caller gives one),
``sparsify.in_chans``, ``sparsify.input_size``, ``sparsify.spatial_dims`` (1, 2 or 3),
``sparsify.downsample_ratio``, ``sparsify.patch_size`` (the mask patch) and ``sparsify.size_multiple``
(what input sizes must be multiples of; each an int, or a list per axis where the axes differ),
``sparsify.stages`` (JSON: name, stride, channels per stage) and
``sparsify.version``, and ``sparsify.left_out`` (JSON: the names of the model's tensors the export
leaves out, the head and anything after the last stage, e.g. EfficientNet's ``conv_head``/``bn2``; also
printed when not empty). ``sparsify-finetune --init backbone.safetensors`` needs no ``--model``
thanks to it. Files are written with ordinary permissions (0666 minus the umask, usually 0644).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import SparsifyError

__all__ = ["export_backbone", "load_backbone", "backbone_state_dict", "backbone_metadata", "left_out_names"]

_META_PREFIX = "sparsify."

_SAFETENSORS = (".safetensors",)
_TORCH = (".pth", ".pt", ".bin")


def _encoder_of(enc_or_spark: nn.Module) -> nn.Module:
    from .model import SparK

    module = getattr(enc_or_spark, "_orig_mod", enc_or_spark)  # unwrap torch.compile
    if isinstance(module, SparK):
        module = module.encoder
    if not isinstance(module, nn.Module):
        raise SparsifyError(
            f"export_backbone needs a SparK or a sparse encoder from sparsify.wrap, got {type(module).__name__}"
        )
    return module


def backbone_state_dict(enc_or_spark: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone weights of a SparK (its encoder's) or of an encoder, as detached CPU tensors."""
    module = _encoder_of(enc_or_spark)
    state = module.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue  # extra state (not a weight)
        out[name] = value.detach().cpu().clone().contiguous()
    if not out:
        raise SparsifyError(f"{type(module).__name__} has no weights to export")
    return out


def left_out_names(enc_or_spark: nn.Module) -> list[str] | None:
    """The names of the wrapped model's state_dict tensors that the backbone leaves out, in the model's
    order (the head, and layers after the last stage); None when the encoder does not know its model."""
    encoder = _encoder_of(enc_or_spark)
    source = getattr(encoder, "source_model", None)
    if not isinstance(source, nn.Module):
        return None
    kept = set(encoder.state_dict())
    return [k for k, v in source.state_dict().items() if k not in kept and isinstance(v, torch.Tensor)]


def _header(encoder: nn.Module, model: str | None, extra: Mapping[str, Any] | None) -> dict[str, str]:
    """The safetensors metadata of an export (all values are strings, as the format requires)."""
    from .. import __version__

    meta = {"format": "pt", "producer": "sparsify", f"{_META_PREFIX}version": str(__version__)}
    if model:
        meta[f"{_META_PREFIX}model"] = str(model)
    in_chans = getattr(encoder, "in_chans", None)
    if in_chans is not None:
        meta[f"{_META_PREFIX}in_chans"] = str(int(in_chans))
    size = getattr(encoder, "input_size", None)
    if size is not None:
        meta[f"{_META_PREFIX}input_size"] = json.dumps([int(v) for v in size])
    ratio = getattr(encoder, "downsample_ratio", None)
    if ratio is not None:
        # the spatial rank and the mask geometry (encoders from before N-d support are 2-D, masked per
        # downsample ratio), so a reader knows what the weights were pretrained on
        meta[f"{_META_PREFIX}spatial_dims"] = str(int(getattr(encoder, "spatial_dims", 2)))
        meta[f"{_META_PREFIX}downsample_ratio"] = json.dumps(_per_axis_json(ratio))
        meta[f"{_META_PREFIX}patch_size"] = json.dumps(_per_axis_json(getattr(encoder, "patch_size", None) or ratio))
        # input sizes must be multiples of this: R, or more with a down-up block inside a stage
        multiple = getattr(encoder, "size_multiple", None) or ratio
        meta[f"{_META_PREFIX}size_multiple"] = json.dumps(_per_axis_json(multiple))
    stages = getattr(encoder, "stages", None)
    if stages:
        meta[f"{_META_PREFIX}stages"] = json.dumps(
            [
                {"name": str(st.name), "stride": _per_axis_json(st.stride), "channels": int(st.channels)}
                for st in stages
            ]
        )
    left = left_out_names(encoder)
    if left is not None:
        meta[f"{_META_PREFIX}left_out"] = json.dumps(left)
    for key, value in (extra or {}).items():
        meta[f"{_META_PREFIX}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return meta


def _per_axis_json(value: Any) -> int | list[int]:
    """An int, or one int per axis as a list (JSON has no tuples)."""
    if isinstance(value, (tuple, list)):
        return [int(v) for v in value]
    return int(value)


def _ordinary_permissions(path: Path) -> None:
    """0666 minus the umask, like any file a program creates (safetensors writes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.chmod(path, 0o666 & ~mask)
    except OSError:  # e.g. a file system without permissions
        pass


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _SAFETENSORS + _TORCH:
        raise SparsifyError(
            f"cannot tell the checkpoint format from {str(path)!r}; use a .safetensors, .pth or .pt file name"
        )
    return suffix


def export_backbone(
    enc_or_spark: nn.Module,
    path: str | os.PathLike[str],
    *,
    model: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write the pretrained backbone weights (original names, no head, no SparK decoder) to ``path``.

    The format follows the suffix: ``.safetensors`` (recommended) or ``.pth``/``.pt`` (``torch.save``
    of a plain state_dict). Parent folders are created. Returns the written path.

    Args:
        enc_or_spark: a :class:`SparK` or the encoder from ``sparsify.wrap``.
        path: the file to write.
        model: how to rebuild the architecture (e.g. ``"resnet50"``, ``"torchvision:resnet50"``), stored
            in a ``.safetensors`` header as ``sparsify.model``.
        metadata: more header entries (stored under ``sparsify.<key>``; non-strings as JSON).
    """
    path = Path(path)
    suffix = _suffix(path)
    encoder = _encoder_of(enc_or_spark)
    state = backbone_state_dict(encoder)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in _SAFETENSORS:
        from safetensors.torch import save_file

        save_file(state, str(path), metadata=_header(encoder, model, metadata))
    else:
        torch.save(state, path)
    _ordinary_permissions(path)
    left = left_out_names(encoder)
    if left:  # say what a strict load into the whole model will miss (and why: it is not the backbone)
        shown = ", ".join(left[:12]) + (f", ... ({len(left) - 12} more)" if len(left) > 12 else "")
        print(f"export_backbone: left out {len(left)} tensor(s) of the model (head / after the last stage): {shown}")
    return path


def backbone_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a ``.safetensors`` export says about its architecture (empty for other files or old exports).

    Returns:
        a dict with any of ``model`` (str), ``in_chans`` (int), ``input_size`` ((H, W), (D, H, W) or
        (L,)), ``spatial_dims`` (int), ``downsample_ratio``, ``patch_size`` and ``size_multiple`` (int,
        or a tuple per axis), ``stages`` (list of dicts) and ``version`` (str), plus any other ``sparsify.*`` entry as
        stored. Files exported before N-d support lack ``spatial_dims`` and ``patch_size``: they are 2-D,
        masked per downsample ratio.

    Raises:
        SparsifyError: when the file is missing or not a readable safetensors file.
    """
    path = Path(path)
    if path.suffix.lower() not in _SAFETENSORS:
        return {}
    _check_exists(path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = dict(f.metadata() or {})
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise _unreadable(path, err) from err
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not key.startswith(_META_PREFIX):
            continue
        name = key[len(_META_PREFIX) :]
        if name in ("model", "version"):
            out[name] = value
            continue
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    for key in ("input_size", "downsample_ratio", "patch_size", "size_multiple"):
        if isinstance(out.get(key), list):
            out[key] = tuple(out[key])
    for stage in out.get("stages") or []:
        if isinstance(stage, dict) and isinstance(stage.get("stride"), list):
            stage["stride"] = tuple(stage["stride"])  # per-axis strides, as the encoder reports them
    return out


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise SparsifyError(f"checkpoint {str(path)!r} does not exist")


def _unreadable(path: Path, err: BaseException) -> SparsifyError:
    size = path.stat().st_size if path.exists() else 0
    why = "it is empty" if size == 0 else f"{type(err).__name__}: {err}"
    return SparsifyError(
        f"cannot read {str(path)!r} as a {path.suffix} file ({why}); it may be truncated or of another format. "
        "Export it again with sparsify.export_backbone"
    )


def load_backbone(path: str | os.PathLike[str], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Read a state_dict written by :func:`export_backbone`; with ``model``, also load it into the model.

    ``.safetensors`` files are read with safetensors, ``.pth``/``.pt`` with
    ``torch.load(weights_only=True)``; tensors land on the CPU.

    Given ``model``, the file must fit it: every tensor in the file must exist in the model with the same
    shape, and the model's tensors the file lacks must all come after the last one it has (the head that
    ``sparsify.wrap`` cut away). Anything else means another architecture and is refused.

    Raises:
        SparsifyError: missing, empty, truncated or foreign files, and files that do not fit ``model``.
    """
    path = Path(path)
    suffix = _suffix(path)
    _check_exists(path)
    try:
        if suffix in _SAFETENSORS:
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every decoder error means "not a usable file"
        raise _unreadable(path, err) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SparsifyError(f"{str(path)!r} does not hold a plain state_dict of tensors")
    if not state:
        raise SparsifyError(f"{str(path)!r} holds no tensors; export the backbone again")
    if model is not None:
        _load_into(model, state, path)
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape)]
    order = list(own)
    last = max((order.index(k) for k in state if k in own), default=-1)
    missing_inside = [k for k in order[: last + 1] if k not in state and not k.endswith("num_batches_tracked")]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the model lacks (e.g. {', '.join(unexpected[:3])})")
    if wrong_shape:
        k = wrong_shape[0]
        problems.append(
            f"{len(wrong_shape)} of other shapes (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})"
        )
    if missing_inside:
        problems.append(f"{len(missing_inside)} of the model's tensors missing (e.g. {', '.join(missing_inside[:3])})")
    if problems:
        raise SparsifyError(
            f"{str(path)!r} does not fit this {type(model).__name__}: {'; '.join(problems)}. "
            "It was exported from another architecture; build the model it came from "
            "(see sparsify.spark.backbone_metadata)"
        )
    model.load_state_dict(state, strict=False)
