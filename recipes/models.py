"""Build the user's CNN from a name, never downloading weights, and load a local state dict.

Model names:

* ``resnet50`` or ``timm:convnext_tiny`` - a timm model (``pretrained=False``);
* ``torchvision:resnet50`` - a torchvision model (``weights=None``);
* ``package.module:function`` or ``path/to/file.py:function`` - the user's own factory, called with
  no arguments (or with ``num_classes`` / ``in_chans`` when it accepts them and they are asked for).
  A factory that takes ``**kwargs`` is tried with them, and called again without any it turns out to
  refuse (``my_cnn(**kw)`` handing them on to a class without ``in_chans``); a head it cannot size is
  replaced afterwards, so pretraining and fine-tuning build the same network from the same factory.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cli import RecipeError

__all__ = [
    "DROP_PATH_DEFAULTS",
    "ModelSpec",
    "parse_model_spec",
    "build_model",
    "default_drop_path",
    "backbone_header",
    "load_state_dict_file",
    "load_init",
    "classifier_names",
    "head_prefixes",
    "model_slug",
    "same_model_spec",
    "portable_model_spec",
    "wrap_for_command_line",
    "SMALL_RESNET3D",
    "small_resnet3d",
]

# Drop-path rates of the SparK paper's pretraining recipe (design.md section 7).
DROP_PATH_DEFAULTS = {
    "resnet50": 0.05,
    "resnet101": 0.08,
    "resnet152": 0.10,
    "resnet200": 0.15,
    "convnext_small": 0.2,
    "convnext_base": 0.3,
    "convnext_large": 0.4,
}


#: The ``--model`` spec of the built-in small 3-D network (the volume presets' default).
SMALL_RESNET3D = "sparsify.recipes.models:small_resnet3d"


class _Block3d(nn.Module):
    """A 3-D basic residual block: two 3x3x3 convolutions, BatchNorm, a projection where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.act = nn.ReLU(inplace=True)
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(y)) + self.down(x))


class SmallResNet3d(nn.Module):
    """A small 3-D ResNet (about 1M parameters, total stride 16) for volumes: stem, three stages, head."""

    def __init__(self, in_chans: int = 1, num_classes: int = 2, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(in_chans, widths[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm3d(widths[0]),
            nn.ReLU(inplace=True),
        )
        self.layer1 = _Block3d(widths[0], widths[1], 2)
        self.layer2 = _Block3d(widths[1], widths[2], 2)
        self.layer3 = _Block3d(widths[2], widths[3], 2)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def small_resnet3d(in_chans: int = 1, num_classes: int = 2) -> nn.Module:
    """The built-in small 3-D ResNet of ``sparsify-pretrain --volumes`` (``--model`` :data:`SMALL_RESNET3D`)."""
    return SmallResNet3d(in_chans=in_chans, num_classes=num_classes)


class ModelSpec:
    """A parsed ``--model`` value: ``kind`` is "timm", "torchvision" or "factory"."""

    def __init__(self, kind: str, name: str, text: str) -> None:
        self.kind = kind
        self.name = name
        self.text = text

    def __repr__(self) -> str:
        return f"ModelSpec({self.kind!r}, {self.name!r})"


def parse_model_spec(text: str) -> ModelSpec:
    """Split a ``--model`` value into its source and name (see the module docstring)."""
    text = text.strip()
    if not text:
        raise RecipeError("--model is empty; give a timm name (resnet50), torchvision:NAME or package.module:function")
    prefix, sep, rest = text.partition(":")
    if sep and prefix in ("timm", "torchvision", "tv"):
        return ModelSpec("timm" if prefix == "timm" else "torchvision", rest, text)
    if sep and len(prefix) == 1 and os.name == "nt":  # a Windows drive letter, not a factory
        return ModelSpec("factory", text, text)
    if sep:
        return ModelSpec("factory", text, text)
    return ModelSpec("timm", text, text)


def model_slug(text: str) -> str:
    """A short, file-name-safe name for a model spec (for run directories)."""
    spec = parse_model_spec(text)
    if spec.kind == "factory":  # the module's own name too: two files may both define ``make``
        module, _, func = spec.name.rpartition(":")
        name = f"{Path(module).stem if module.endswith('.py') else module}-{func}"
    elif spec.kind == "torchvision":  # never the same folder as timm's model of the same name
        name = f"torchvision-{spec.name}"
    else:
        name = spec.name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def same_model_spec(a: str, b: str) -> bool:
    """Whether two ``--model`` values name the same model (``timm:resnet18`` and ``resnet18`` do, and so do a
    factory file's relative and absolute paths)."""
    sa, sb = parse_model_spec(portable_model_spec(a)), parse_model_spec(portable_model_spec(b))
    return (sa.kind, sa.name) == (sb.kind, sb.name)


def default_drop_path(text: str) -> float:
    """The paper's drop-path rate for a model name (0 for names it does not list)."""
    spec = parse_model_spec(text)
    return DROP_PATH_DEFAULTS.get(spec.name, 0.0) if spec.kind == "timm" else 0.0


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def portable_model_spec(text: str) -> str:
    """``text`` with a factory file's path made absolute, so that it still names the file from another folder.

    What a backbone header stores: ``sparsify-finetune`` may run anywhere. Other specs are returned unchanged.
    """
    file = _factory_file(text)
    if file is None:
        return text
    path, attr = file
    return f"{path.resolve()}:{attr}" if path.is_file() else text


def spec_from_run(text: str, run_cwd: str | None) -> str:
    """A run's ``--model`` text, readable from the current folder: a relative factory file or module not
    found from here is looked up in ``run_cwd``, the folder the run was started in."""
    if not run_cwd or parse_model_spec(text).kind != "factory":
        return text
    file = _factory_file(text)
    if file is None:
        if run_cwd not in sys.path:
            sys.path.append(run_cwd)  # after everything else: a module importable from here still wins
        return text
    path, attr = file
    if not path.is_absolute() and not path.is_file() and (Path(run_cwd) / path).is_file():
        return f"{Path(run_cwd) / path}:{attr}"
    return text


def _factory_file(text: str) -> tuple[Path, str] | None:
    """(file, function) of a factory written as a file path (``nets.py:fn``, ``src/nets:fn``), else None."""
    spec = parse_model_spec(text)
    if spec.kind != "factory":
        return None
    module_name, _, attr = spec.name.rpartition(":")
    if not (module_name.endswith(".py") or os.sep in module_name or "/" in module_name):
        return None
    return Path(module_name).expanduser(), attr


def wrap_for_command_line(wrap: Callable[..., Any], model: nn.Module, input_size: tuple[int, int]) -> Any:
    """``wrap(model, input_size=...)`` with its refusals phrased for the recipes' flags.

    The library checks the size against the network's total stride before anything else and says which
    sizes fit; on the command line that size is ``--input-size``, so the message names the flag.
    """
    from sparsify.errors import SparsifyError

    try:
        return wrap(model, input_size=input_size)
    except SparsifyError as err:
        raise RecipeError(re.sub(r"\binput_size\b", "--input-size", str(err))) from err


def _call_factory(
    fn: Callable[..., Any], named: dict[str, Any], offered: dict[str, Any]
) -> tuple[Any, set[str]]:
    """``fn(**named, **offered)`` and the keywords it took; ``offered`` (for ``**kwargs``) are dropped where refused.

    A factory's ``**kwargs`` promise nothing: ``def my_cnn(**kw): return MyCNN(**kw)`` fails with "unexpected
    keyword argument 'in_chans'" when MyCNN has none. Such a keyword is left out and the call repeated.
    """
    offered = dict(offered)
    while True:
        try:
            return fn(**named, **offered), set(named) | set(offered)
        except TypeError as err:
            refused = [k for k in offered if f"unexpected keyword argument '{k}'" in str(err)]
            if not refused:
                raise
            for k in refused:
                offered.pop(k)


def _load_factory(text: str) -> Callable[..., Any]:
    module_name, _, attr = text.rpartition(":")
    if not module_name or not attr:
        raise RecipeError(f"--model '{text}': a factory is written package.module:function")
    try:
        file = _factory_file(text)
        if file is not None:
            path = file[0]
            if not path.is_file():
                raise RecipeError(f"--model '{text}': file '{module_name}' does not exist")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules.setdefault(path.stem, module)
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except RecipeError:
        raise
    except ImportError as err:
        raise RecipeError(
            f"--model '{text}': cannot import module '{module_name}' ({err}); is it installed or on PYTHONPATH?"
        ) from err
    except Exception as err:
        raise RecipeError(f"--model '{text}': importing '{module_name}' failed: {type(err).__name__}: {err}") from err
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        public = [n for n in dir(module) if not n.startswith("_")]
        raise RecipeError(f"--model '{text}': module '{module_name}' has no callable '{attr}'{_suggest(attr, public)}")
    return fn


def build_model(
    text: str,
    num_classes: int | None = None,
    in_chans: int | None = None,
    drop_path: float = 0.0,
) -> nn.Module:
    """Build the model named by ``text`` with random weights (nothing is ever downloaded).

    Args:
        text: the ``--model`` value.
        num_classes: classifier size (``None``: the model's default; pretraining cuts the head anyway).
        in_chans: input channels (``None``: the model's default, 3 for timm and torchvision).
        drop_path: stochastic-depth rate where the model supports it.

    Raises:
        RecipeError: for unknown names, import failures and factories that fail or return a non-module.
    """
    spec = parse_model_spec(text)
    kwargs: dict[str, Any] = {}
    try:
        if spec.kind == "timm":
            import timm

            if not timm.is_model(spec.name):
                raise RecipeError(
                    f"unknown timm model '{spec.name}'{_suggest(spec.name, timm.list_models())} "
                    "(list them with timm.list_models('*pattern*'); torchvision models are written "
                    "torchvision:NAME, your own as package.module:function)"
                )
            if num_classes is not None:
                kwargs["num_classes"] = num_classes
            if in_chans is not None:
                kwargs["in_chans"] = in_chans
            if drop_path:
                kwargs["drop_path_rate"] = drop_path
            model = timm.create_model(spec.name, pretrained=False, **kwargs)
        elif spec.kind == "torchvision":
            import torchvision

            names = torchvision.models.list_models()
            if spec.name not in names:
                raise RecipeError(f"unknown torchvision model '{spec.name}'{_suggest(spec.name, names)}")
            if num_classes is not None:
                kwargs["num_classes"] = num_classes
            if drop_path and spec.name.startswith(("convnext", "efficientnet", "regnet")):
                if spec.name.startswith("convnext"):
                    kwargs["stochastic_depth_prob"] = drop_path
            model = torchvision.models.get_model(spec.name, weights=None, **kwargs)
            if in_chans not in (None, 3):
                raise RecipeError(
                    f"torchvision models are built for 3 input channels; for in_chans={in_chans} use a timm "
                    "model (timm:NAME) or your own factory"
                )
        else:
            fn = _load_factory(spec.name)
            wanted = {"num_classes": num_classes, "in_chans": in_chans, "drop_path_rate": drop_path or None}
            named = {k: v for k, v in wanted.items() if v is not None and _names(fn, k)}
            offered = {k: v for k, v in wanted.items() if v is not None and k not in named and _accepts(fn, k)}
            model, taken = _call_factory(fn, named, offered)
            if not isinstance(model, nn.Module):
                raise RecipeError(
                    f"--model '{text}': the factory returned {type(model).__name__}, not a torch.nn.Module"
                )
            if num_classes is not None and "num_classes" not in taken:
                _reset_head(model, num_classes, text)
    except RecipeError:
        raise
    except Exception as err:
        raise RecipeError(f"could not build model '{text}': {type(err).__name__}: {err}") from err
    return model


def _names(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn``'s signature has a parameter called ``name`` (not just ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params and params[name].kind is not inspect.Parameter.VAR_KEYWORD


def _reset_head(model: nn.Module, num_classes: int, text: str) -> None:
    """Give a factory-built model a ``num_classes`` classifier: reset_classifier, else its last Linear."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return
    names = classifier_names(model)
    if not names:
        raise RecipeError(
            f"--model '{text}': cannot find a classifier to resize to {num_classes} classes; let the factory "
            "accept num_classes=..."
        )
    parent_name, _, child = names[-1].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module names that make up the classification head (what an exported backbone lacks).

    The classifier (see :func:`classifier_names`) and, when it sits inside a container such as timm's
    ``head`` or torchvision's ``classifier``, that whole container; plus timm's post-pooling
    ``conv_head`` / ``norm_head`` where present.
    """
    names: list[str] = []
    for name in classifier_names(model):
        names.append(name)
        parent = name.rpartition(".")[0]
        if parent:
            names.append(parent)
    for extra in ("conv_head", "norm_head", "head"):
        if hasattr(model, extra) and isinstance(getattr(model, extra), nn.Module):
            names.append(extra)
    return tuple(dict.fromkeys(names))


def classifier_names(model: nn.Module) -> list[str]:
    """Module names of the classifier: timm's ``get_classifier()``, else the last ``nn.Linear``."""
    if hasattr(model, "get_classifier"):
        try:
            head = model.get_classifier()
        except Exception:  # noqa: BLE001
            head = None
        if isinstance(head, nn.Module):
            for name, mod in model.named_modules():
                if mod is head and name:
                    return [name]
    last = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    return last[-1:]


def backbone_header(init: str | os.PathLike[str] | None) -> dict[str, Any]:
    """model / in_chans / input_size as written by ``export_backbone`` into a backbone file's header ({} if none)."""
    if not init or not str(init).endswith(".safetensors"):
        return {}
    from sparsify.spark import backbone_metadata

    meta = backbone_metadata(Path(init).expanduser())
    found: dict[str, Any] = {}
    if meta.get("model"):
        found["model"] = meta["model"]
    if isinstance(meta.get("in_chans"), int):
        found["in_chans"] = meta["in_chans"]
    size = meta.get("input_size")
    if meta.get("spatial_dims", 2) != 2 or (size and len(size) != 2):
        raise RecipeError(
            f"'{init}' is a {meta.get('spatial_dims') or len(size)}-D backbone (pretrained on volumes); "
            "sparsify-finetune fine-tunes 2-D image classifiers only. Load it into your 3-D network in Python: "
            "sparsify.load_backbone(path, model), or model.load_state_dict(safetensors.torch.load_file(path), "
            "strict=False) (the missing keys are the head's; the file's 'sparsify.left_out' header lists them)"
        )
    if size:
        h, w = size
        found["input_size"] = f"{h}x{w}"
    return found


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict: ``.safetensors`` via safetensors, else ``torch.load(weights_only=True)``.

    Accepts the usual wrappers (``{"model": ...}``, ``{"state_dict": ...}``) and strips a DDP
    ``module.`` prefix. Raises RecipeError when the file is missing or unreadable.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise RecipeError(f"weights file '{path}' does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:
        raise RecipeError(f"cannot read weights file '{path}': {type(err).__name__}: {err}") from err
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise RecipeError(f"weights file '{path}' does not hold a state dict")
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k[len("module.") :] if k.startswith("module.") else k] = v
    return out


def load_init(model: nn.Module, path: str | os.PathLike[str], allow_missing: tuple[str, ...] = ()) -> list[str]:
    """Load a local state dict into ``model``; only keys under ``allow_missing`` prefixes may be absent.

    The file may not hold tensors the model lacks (a deeper or other architecture).

    Tensors whose shapes differ (e.g. an old classifier with another class count) are dropped when they
    belong to ``allow_missing`` modules, and are an error otherwise.

    Returns:
        the model keys that were left at their fresh initialisation.

    Raises:
        RecipeError: when the file does not fit the model.
    """
    state = load_state_dict_file(path)
    own = model.state_dict()

    def allowed(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in allow_missing)

    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    bad_shape = [k for k in mismatched if not allowed(k)]
    if bad_shape:
        k = bad_shape[0]
        raise RecipeError(
            f"'{path}' does not fit this model: {k} has shape {tuple(state[k].shape)} in the file but "
            f"{tuple(own[k].shape)} in the model ({len(bad_shape)} such tensors); "
            "was it saved from another architecture?"
        )
    for k in mismatched:
        state.pop(k)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    not_allowed = [k for k in missing if not allowed(k)]
    if not_allowed:
        raise RecipeError(
            f"'{path}' does not fit this model: {len(not_allowed)} tensors are missing from it "
            f"(e.g. {', '.join(not_allowed[:3])}); was it saved from another architecture?"
        )
    loaded = len(state) - len(result.unexpected_keys)
    if loaded == 0:
        raise RecipeError(f"'{path}' shares no tensor names with this model; was it saved from another architecture?")
    extra = [k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")]
    if extra:  # e.g. a deeper network's backbone: its extra blocks would be dropped without a word
        raise RecipeError(
            f"'{path}' does not fit this model: it holds {len(extra)} tensors the model lacks "
            f"(e.g. {', '.join(extra[:3])}); was it saved from another architecture?"
        )
    return missing
