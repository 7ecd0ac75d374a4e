"""export_backbone / load_backbone on the stand-in encoder (real timm models: test_real_models.py)."""

from __future__ import annotations

import pytest
import torch

from sparsify.errors import SparsifyError
from sparsify.spark import SparK, export_backbone, load_backbone

from .toy_encoder import ToyEncoder


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt"])
@pytest.mark.parametrize("from_spark", [True, False])
def test_export_round_trip(tmp_path, suffix, from_spark):
    torch.manual_seed(0)
    enc = ToyEncoder(1, (8, 16), (4, 8))
    spark = SparK(enc, decoder_width=16)
    x = torch.randn(2, 1, 32, 48)
    spark(x).backward()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.1)  # differ from any fresh init
    path = export_backbone(spark if from_spark else enc, tmp_path / "sub" / f"backbone{suffix}")
    assert path.is_file()
    state = load_backbone(path)
    assert set(state) == set(enc.state_dict())  # original names, nothing from SparK's decoder
    fresh = ToyEncoder(1, (8, 16), (4, 8))
    fresh.load_state_dict(state, strict=True)
    for a, b in zip(enc.dense_encoder()(x), fresh.dense_encoder()(x)):
        torch.testing.assert_close(a, b)


def test_export_unwraps_torch_compile_wrapper(tmp_path):
    enc = ToyEncoder(1, (8,), (4,))

    class Compiled(torch.nn.Module):  # what torch.compile returns exposes the original as _orig_mod
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    spark = SparK(enc, decoder_width=8)
    state = load_backbone(export_backbone(Compiled(spark), tmp_path / "b.safetensors"))
    assert set(state) == set(enc.state_dict())


def test_bad_paths(tmp_path):
    enc = ToyEncoder(1, (8,), (4,))
    with pytest.raises(SparsifyError, match=".safetensors"):
        export_backbone(enc, tmp_path / "b.npz")
    with pytest.raises(SparsifyError, match="does not exist"):
        load_backbone(tmp_path / "missing.safetensors")
    with pytest.raises(SparsifyError, match="SparK"):
        export_backbone("not a module", tmp_path / "b.pth")


def test_load_refuses_non_state_dict(tmp_path):
    torch.save({"epoch": 3}, tmp_path / "x.pth")
    with pytest.raises(SparsifyError, match="state_dict"):
        load_backbone(tmp_path / "x.pth")
