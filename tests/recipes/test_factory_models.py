"""A model built by the user's own factory: pretrain it, then fine-tune its backbone from anywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
from _recipe_helpers import FAST_PRETRAIN, run_pretrain
from sparsify.recipes import finetune
from sparsify.recipes.models import build_model, portable_model_spec

# A factory that hands its keyword arguments on to a class which takes neither in_chans nor num_classes:
# the shape of factory that fine-tuning used to break ("unexpected keyword argument 'in_chans'").
FACTORY = '''
from torch import nn


class MyCNN(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        layers, c_in = [], 3
        for c in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, 10)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def my_cnn(**kwargs):
    return MyCNN(**kwargs)
'''


def _project(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "mycnn.py").write_text(FACTORY)
    return root


def test_a_kwargs_factory_is_built_alike_for_pretraining_and_fine_tuning(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(_project(tmp_path / "proj"))
    plain = build_model("mycnn.py:my_cnn")
    asked = build_model("mycnn.py:my_cnn", num_classes=3, in_chans=3, drop_path=0.1)  # what fine-tuning asks
    assert type(asked).__name__ == type(plain).__name__ == "MyCNN"
    assert asked.fc.out_features == 3  # the head resized afterwards, nothing refused
    assert {k: v.shape for k, v in asked.state_dict().items() if not k.startswith("fc.")} == {
        k: v.shape for k, v in plain.state_dict().items() if not k.startswith("fc.")
    }
    # a TypeError that is not about an offered keyword is still the factory's own error
    (tmp_path / "proj" / "broken.py").write_text("def make(**kw):\n    raise TypeError('my own mistake')\n")
    with pytest.raises(Exception, match="my own mistake"):
        build_model("broken.py:make", in_chans=3)


def test_factory_pretrains_and_fine_tunes_from_another_folder(
    image_folder: Path, labelled_folder: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    proj = _project(tmp_path / "proj")
    monkeypatch.chdir(proj)
    flags = list(FAST_PRETRAIN)
    flags[flags.index("--model") + 1] = "mycnn.py:my_cnn"  # relative, as a user types it
    code, _, err = run_pretrain(["--data", str(image_folder), *flags, "--steps", "2", "--vis-images", "0",
                                 "--out", "run"], capsys)  # fmt: skip
    assert code == 0, err
    backbone = proj / "run" / "backbone.safetensors"
    from sparsify.spark import backbone_metadata

    assert backbone_metadata(backbone)["model"] == f"{(proj / 'mycnn.py').resolve()}:my_cnn"
    assert portable_model_spec("resnet18") == "resnet18"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    common = ["--data", str(labelled_folder), "--init", str(backbone), "--batch-size", "4", "--workers", "0",
              "--no-tensorboard", "--steps", "2"]  # fmt: skip
    assert finetune.main([*common, "--out", "ft"]) == 0, capsys.readouterr().err
    assert "fine-tune of " in capsys.readouterr().out and (elsewhere / "ft" / "final.safetensors").is_file()

    # the factory moved: the error says so and suggests --model, which then works
    moved = tmp_path / "moved"
    (proj / "mycnn.py").rename(_project(moved) / "other.py")
    (moved / "mycnn.py").unlink()
    assert finetune.main([*common, "--out", "ft2"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "pass --model" in err
    assert finetune.main([*common, "--model", f"{moved / 'other.py'}:my_cnn", "--out", "ft3"]) == 0


def test_relative_and_absolute_factory_paths_name_the_same_model(tmp_path: Path, monkeypatch) -> None:
    from sparsify.recipes.models import same_model_spec

    monkeypatch.chdir(_project(tmp_path / "proj"))
    absolute = portable_model_spec("mycnn.py:my_cnn")
    assert absolute == f"{(tmp_path / 'proj' / 'mycnn.py').resolve()}:my_cnn"
    assert same_model_spec("mycnn.py:my_cnn", absolute)
    assert not same_model_spec("mycnn.py:other", absolute)
    assert portable_model_spec("missing.py:f") == "missing.py:f"  # nothing to resolve: left as given
    assert portable_model_spec("pkg.module:f") == "pkg.module:f" and same_model_spec("timm:resnet18", "resnet18")
