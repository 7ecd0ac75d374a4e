"""Model building from names (never downloading), state-dict loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _recipe_helpers import TINY
from safetensors.torch import save_file
from sparsify.recipes.cli import RecipeError
from sparsify.recipes.models import (
    build_model,
    classifier_names,
    default_drop_path,
    head_prefixes,
    load_init,
    parse_model_spec,
)


def test_parse_specs() -> None:
    assert parse_model_spec("resnet50").kind == "timm"
    assert parse_model_spec("timm:convnext_tiny").name == "convnext_tiny"
    assert parse_model_spec("torchvision:resnet50").kind == "torchvision"
    assert parse_model_spec("my.pkg:make").kind == "factory"


def test_build_timm_torchvision_factory() -> None:
    m = build_model("timm:resnet18", num_classes=7)
    assert m.fc.out_features == 7
    tv = build_model("torchvision:resnet18")
    assert isinstance(tv, torch.nn.Module)
    tiny = build_model(TINY, num_classes=3, in_chans=1)
    assert tiny.fc.out_features == 3 and tiny.stages[0][0].in_channels == 1
    assert classifier_names(tiny) == ["fc"]
    assert "head" in head_prefixes(build_model("convnext_atto"))


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(RecipeError, match="did you mean.*resnet50"):
        build_model("resnet5O")
    with pytest.raises(RecipeError, match="unknown torchvision model"):
        build_model("torchvision:nope")
    with pytest.raises(RecipeError, match="cannot import module"):
        build_model("no_such_pkg_xyz.models:make")
    with pytest.raises(RecipeError, match="not a torch.nn.Module"):
        build_model(TINY.replace("tiny_cnn", "not_a_module"))
    with pytest.raises(RecipeError, match="has no callable"):
        build_model(TINY.replace("tiny_cnn", "tiny_cnm"))


def test_drop_path_defaults() -> None:
    assert default_drop_path("resnet50") == 0.05
    assert default_drop_path("timm:convnext_base") == 0.3
    assert default_drop_path("resnet18") == 0.0


def test_load_init_head_only(tmp_path: Path) -> None:
    src = build_model(TINY, num_classes=10)
    backbone = {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    save_file(backbone, str(tmp_path / "b.safetensors"))
    torch.save({"model": src.state_dict()}, tmp_path / "full.pth")
    dst = build_model(TINY, num_classes=4)
    fresh = load_init(dst, tmp_path / "b.safetensors", allow_missing=head_prefixes(dst))
    assert set(fresh) == {"fc.weight", "fc.bias"}
    assert torch.equal(dst.stages[0][0].weight, src.stages[0][0].weight)
    # the 10-class head in the full file is dropped (shape mismatch inside the head), not an error
    load_init(dst, tmp_path / "full.pth", allow_missing=head_prefixes(dst))
    with pytest.raises(RecipeError, match="missing"):
        load_init(dst, tmp_path / "b.safetensors")  # head not allowed to be missing
    other = build_model("resnet18")
    with pytest.raises(RecipeError, match="another architecture"):
        load_init(other, tmp_path / "b.safetensors", allow_missing=head_prefixes(other))
    with pytest.raises(RecipeError, match="does not exist"):
        load_init(dst, tmp_path / "nope.safetensors")
