"""export_backbone names the model's tensors it leaves out (header ``sparsify.left_out`` and a printed line)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import sparsify
from sparsify.spark.export import backbone_metadata, left_out_names, load_backbone


class _Net3d(nn.Module):
    """A hand-written 3-D CNN: two strided convs, a 1x1x1 projection at the last stride, a pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv3d(1, 8, 3, stride=2, padding=1)
        self.na = nn.BatchNorm3d(8)
        self.b = nn.Conv3d(8, 16, 3, stride=2, padding=1)
        self.proj = nn.Conv3d(16, 32, 1)
        self.fc = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(torch.relu(self.na(self.a(x))))
        x = self.proj(x).mean(dim=(2, 3, 4))
        return self.fc(x)


def test_efficientnet_head_left_out_is_named_in_header_and_printed(tmp_path: Path, capsys) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("efficientnet_b0", pretrained=False)
    enc = sparsify.wrap(model, input_size=(64, 64))
    path = sparsify.export_backbone(enc, tmp_path / "b.safetensors")
    printed = capsys.readouterr().out
    left = backbone_metadata(path)["left_out"]
    # the stage rule ends the encoder at the last block: conv_head/bn2 (and the classifier) are not backbone
    assert {"conv_head.weight", "bn2.weight", "bn2.running_var", "classifier.weight"} <= set(left)
    assert set(left) == set(model.state_dict()) - set(load_backbone(path))
    assert "left out 8 tensor(s)" in printed and "conv_head.weight" in printed and "bn2.bias" in printed


def test_3d_head_left_out_and_strict_load_of_the_rest(tmp_path: Path, capsys) -> None:
    model = _Net3d()
    enc = sparsify.wrap(model, input_size=(16, 16, 16))
    path = sparsify.export_backbone(enc, tmp_path / "b.safetensors")
    assert "fc.weight, fc.bias" in capsys.readouterr().out
    meta = backbone_metadata(path)
    assert meta["left_out"] == ["fc.weight", "fc.bias"]  # the projection is the last stage; the head is not
    assert meta["left_out"] == [k for k in model.state_dict() if k not in load_backbone(path)]
    assert meta["spatial_dims"] == 3
    # the backbone plus exactly the named tensors is the whole model: a strict load succeeds
    state = load_backbone(path)
    fresh = _Net3d()
    head = {k: v for k, v in fresh.state_dict().items() if k in meta["left_out"]}
    fresh.load_state_dict({**state, **head}, strict=True)
    # .pth exports print the same names (they have no header)
    sparsify.export_backbone(enc, tmp_path / "b.pth")
    assert "fc.bias" in capsys.readouterr().out


def test_nothing_left_out_prints_nothing(tmp_path: Path, capsys) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
    enc = sparsify.wrap(model, input_size=(16, 16))
    assert left_out_names(enc) == []
    path = sparsify.export_backbone(enc, tmp_path / "b.safetensors")
    assert "left out" not in capsys.readouterr().out
    assert backbone_metadata(path)["left_out"] == []
