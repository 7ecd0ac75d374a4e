"""The safetensors header of an export records the spatial rank, the downsample ratio and the mask patch."""

from __future__ import annotations

from types import SimpleNamespace

from sparsify.spark import SparK, backbone_metadata, export_backbone, load_backbone

from .toy_encoder import ToyEncoder


def test_a_3d_export_records_rank_ratio_patch_and_per_axis_stage_strides(tmp_path):
    enc = ToyEncoder(1, (4, 8), [(1, 2, 2), (2, 4, 4)], "batch", spatial_dims=3, patch_size=(1, 2, 2))
    enc.stages = [SimpleNamespace(name=f"s{i}", stride=s, channels=c)
                  for i, (s, c) in enumerate(zip(enc.feature_strides, enc.feature_channels))]
    path = export_backbone(SparK(enc, decoder_width=8), tmp_path / "b.safetensors")
    meta = backbone_metadata(path)
    assert meta["spatial_dims"] == 3
    assert meta["downsample_ratio"] == (2, 4, 4)
    assert meta["patch_size"] == (1, 2, 2)
    assert meta["size_multiple"] == (2, 4, 4)  # no size_multiple attribute: R
    assert [s["stride"] for s in meta["stages"]] == [(1, 2, 2), (2, 4, 4)]
    assert set(load_backbone(path)) == set(enc.state_dict())


def test_isotropic_and_old_encoders_record_ints_and_rank_2(tmp_path):
    enc = ToyEncoder(1, (4, 8), (4, 8), spatial_dims=1)
    meta = backbone_metadata(export_backbone(enc, tmp_path / "a.safetensors"))
    assert (meta["spatial_dims"], meta["downsample_ratio"], meta["patch_size"]) == (1, 8, 8)
    old = ToyEncoder(3, (4, 8), (4, 8))
    del old.spatial_dims, old.patch_size  # an encoder from before N-d support
    meta = backbone_metadata(export_backbone(old, tmp_path / "o.safetensors"))
    assert (meta["spatial_dims"], meta["downsample_ratio"], meta["patch_size"]) == (2, 8, 8)


def test_size_multiple_above_the_ratio_is_recorded(tmp_path):
    enc = ToyEncoder(3, (4, 8), (4, 8))
    enc.size_multiple = 16  # a down-up block inside a stage runs at stride 16
    meta = backbone_metadata(export_backbone(enc, tmp_path / "h.safetensors"))
    assert (meta["downsample_ratio"], meta["size_multiple"]) == (8, 16)
