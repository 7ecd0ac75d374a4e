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


def _wrapped_cnn(depth: int = 2, in_chans: int = 3):
    import sparsify

    layers, c = [], in_chans
    for i in range(depth):
        layers += [torch.nn.Conv2d(c, 8 * (i + 1), 3, 2, 1), torch.nn.BatchNorm2d(8 * (i + 1)), torch.nn.ReLU()]
        c = 8 * (i + 1)
    model = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(c, 5))
    return model, sparsify.wrap(model, input_size=(32, 48))


def test_safetensors_export_describes_its_architecture_with_ordinary_permissions(tmp_path):
    import os
    import stat

    from sparsify.spark import backbone_metadata

    model, enc = _wrapped_cnn(in_chans=2)
    path = export_backbone(enc, tmp_path / "b.safetensors", model="pkg.nets:cnn", metadata={"note": [1, 2]})
    meta = backbone_metadata(path)
    assert meta["model"] == "pkg.nets:cnn" and meta["in_chans"] == 2 and meta["input_size"] == (32, 48)
    assert [(s["stride"], s["channels"]) for s in meta["stages"]] == [(s.stride, s.channels) for s in enc.stages]
    assert meta["version"] and meta["note"] == [1, 2]
    mask = os.umask(0)
    os.umask(mask)
    for p in (path, export_backbone(enc, tmp_path / "b.pth")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask  # safetensors alone writes 0600
    assert backbone_metadata(tmp_path / "b.pth") == {}


def test_load_backbone_refuses_damaged_and_foreign_files(tmp_path):
    model, enc = _wrapped_cnn()
    path = export_backbone(enc, tmp_path / "b.safetensors")
    good = path.read_bytes()
    for name, data in (("empty", b""), ("truncated", good[: len(good) // 2]), ("foreign", b"PK\x03\x04 zip bytes")):
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(data)
        with pytest.raises(SparsifyError, match="cannot read .*Export it again"):
            load_backbone(bad)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(SparsifyError, match="cannot read"):
        load_backbone(tmp_path / "junk.pth")

    fresh, _ = _wrapped_cnn()
    state = load_backbone(path, model=fresh)  # fits: only the head (after the last loaded tensor) is missing
    assert torch.equal(fresh[0].weight, model[0].weight) and "8.weight" not in state
    deeper, deep_enc = _wrapped_cnn(depth=3)
    deep = export_backbone(deep_enc, tmp_path / "deep.safetensors")
    with pytest.raises(SparsifyError, match="lacks.*another architecture"):
        load_backbone(deep, model=fresh)  # extra tensors used to be ignored silently
    with pytest.raises(SparsifyError, match="other shapes"):
        load_backbone(export_backbone(_wrapped_cnn(in_chans=1)[1], tmp_path / "c1.safetensors"), model=fresh)
