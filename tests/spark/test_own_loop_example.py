"""Runs docs/own_loop_example.py (the README's "pretrain my own CNN in my own loop"), shrunk."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import timm
import torch

from sparsify.spark import load_backbone

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "own_loop_example.py"


@pytest.mark.slow
def test_own_loop_example_runs_and_exports(tmp_path, monkeypatch):
    out = tmp_path / "backbone.safetensors"
    for k, v in {
        "EXAMPLE_MODEL": "resnet18",
        "EXAMPLE_SIZE": "64",
        "EXAMPLE_BATCH": "2",
        "EXAMPLE_STEPS": "2",
        "EXAMPLE_OUT": str(out),
    }.items():
        monkeypatch.setenv(k, v)
    torch.manual_seed(0)
    ns = runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert torch.isfinite(ns["loss"])
    state = load_backbone(out)
    fresh = timm.create_model("resnet18", pretrained=False)
    missing = fresh.load_state_dict(state, strict=False).missing_keys
    assert set(missing) == {"fc.weight", "fc.bias"}
    for k, v in state.items():
        assert torch.equal(ns["finetune"].state_dict()[k], v), k
