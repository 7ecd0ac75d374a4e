"""sparsify-pretrain on volumes: the offline default, the 3-D run header, --input-size for 2-D and 3-D, the k-NN
monitor on class folders of volumes, the export header, and clear refusals (3-D runs in the 2-D-only tools,
volumes smaller than the crop under --small-volumes refuse)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _recipe_helpers import metrics, run_pretrain
from sparsify.recipes.cli import RecipeError, parse_input_size
from sparsify.recipes.config import resolve_config
from sparsify.recipes.models import SMALL_RESNET3D, small_resnet3d

# a short offline run: the built-in 3-D network on synthetic phantoms, with the k-NN monitor on class folders
FAST_3D = ["--volumes", "--input-size", "32", "--steps", "3", "--batch-size", "4", "--decoder-width", "16",
           "--sample-length", "8", "--workers", "0", "--no-tensorboard", "--vis-images", "2"]  # fmt: skip


def _class_folders(root: Path, per_class: int = 4, size: int = 20) -> Path:
    """Two classes of .npy volumes: one bright blob centred, or noise only."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
    blob = (((grid - size / 2) ** 2).sum(0) < (size / 4) ** 2).astype(np.float32)
    for c, name in enumerate(("blob", "noise")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            vol = rng.normal(0, 0.2, (size,) * 3).astype(np.float32) + (3 * blob if c == 0 else 0)
            np.save(root / name / f"case{i}.npy", vol)
    return root


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, int]:
    """One offline --volumes run with the 3-D k-NN monitor (shared by the tests that read its outputs)."""
    from sparsify.recipes import pretrain

    base = tmp_path_factory.mktemp("vol")
    knn = _class_folders(base / "knn")
    out = base / "run"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = pretrain.main([*FAST_3D, "--knn-data", str(knn), "--out", str(out)])
    return out, buf.getvalue(), code


@pytest.mark.slow
def test_offline_volume_default_runs_and_states_its_geometry(offline_run: tuple[Path, str, int]) -> None:
    out, printed, code = offline_run
    assert code == 0, printed
    assert "8 synthetic volumes (offline phantoms, no data, no download), 3-D, crop 32x32x32 voxels" in printed
    assert "patch 16x16x16 voxels per axis (D x H x W) -> 2x2x2 patches" in printed
    assert "k-NN monitor: 8 volumes, 2 classes, leave-one-out" in printed
    rows = [r for r in metrics(out) if "knn_top1" in r]
    assert rows and all(0.0 <= r["knn_top1"] <= 1.0 for r in rows)
    for name in ("recon_start.png", "recon_end.png", "backbone.safetensors", "loss_curve.png"):
        assert (out / name).is_file(), name
    assert sorted(r["step"] for r in metrics(out) if "loss" in r) == [1, 2, 3]


@pytest.mark.slow
def test_volume_export_header_and_strict_load(offline_run: tuple[Path, str, int]) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = offline_run[0]
    with safe_open(str(out / "backbone.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["sparsify.spatial_rank"] == "3" and json.loads(meta["sparsify.crop"]) == [32, 32, 32]
    assert meta["sparsify.spatial_dims"] == "3" and meta["sparsify.intensity"] == "synthetic"
    assert json.loads(meta["sparsify.left_out"]) == ["fc.weight", "fc.bias"]
    state = load_file(str(out / "backbone.safetensors"))
    model = small_resnet3d()
    head = {k: v for k, v in model.state_dict().items() if k in ("fc.weight", "fc.bias")}
    model.load_state_dict({**state, **head}, strict=True)  # the backbone and the named head are the whole model


@pytest.mark.slow
def test_reconstruct_and_finetune_refuse_3d_runs_clearly(offline_run: tuple[Path, str, int], tmp_path: Path,
                                                         capsys) -> None:  # fmt: skip
    from sparsify.recipes import finetune, reconstruct

    out = offline_run[0]
    capsys.readouterr()
    assert reconstruct.main([str(out)]) == 2
    err = capsys.readouterr().err
    assert "is a 3-D (volume) run" in err and "recon_end.png" in err
    assert finetune.main(["--init", str(out / "backbone.safetensors"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a 3-D backbone" in err and "sparsify.load_backbone" in err


def test_input_size_forms_for_each_rank() -> None:
    assert parse_input_size("16", 3) == (16, 16, 16)
    assert parse_input_size("16x32x48", 3) == (16, 32, 48)
    assert parse_input_size(224, 2) == (224, 224)
    assert parse_input_size("192x256", 2) == (192, 256)
    assert parse_input_size([16, 16, 16], 3) == (16, 16, 16)  # a resumed run's stored setting
    with pytest.raises(RecipeError, match=r"is 2-D \(HxW\) but this run trains on 3-D volumes: give N \(a cube\)"):
        parse_input_size("32x32", 3)
    with pytest.raises(RecipeError, match=r"is 3-D \(DxHxW\) but this run trains on 2-D images"):
        parse_input_size("8x32x32", 2)
    for bad in ("0", "a", "12x", "16x-1x16", ""):
        with pytest.raises(RecipeError, match="input size must be positive integers"):
            parse_input_size(bad, 3)


def test_presets_follow_the_data(tmp_path: Path) -> None:
    cfg = resolve_config({"volumes": True, "out": "."})
    assert (cfg.preset, cfg.model, cfg.input_size, cfg.volumes) == ("volumes", SMALL_RESNET3D, (32, 32, 32), True)
    scans = tmp_path / "scans"
    scans.mkdir()
    np.save(scans / "a.npy", np.zeros((8, 8, 8), np.float32))
    cfg = resolve_config({"data": str(scans), "out": "."})  # detected: no --volumes needed
    assert (cfg.preset, cfg.input_size, cfg.volumes) == ("scans", (64, 64, 64), True)
    assert resolve_config({"data": str(scans), "input_size": "16x32x32", "out": "."}).input_size == (16, 32, 32)
    with pytest.raises(RecipeError, match="--preset default is for images, but this run trains on volumes"):
        resolve_config({"data": str(scans), "preset": "default", "out": "."})
    with pytest.raises(RecipeError, match="--intensity and --volume-cache are for volumes"):
        resolve_config({"intensity": "ct:lung", "out": "."})


def test_help_documents_the_volume_flags() -> None:
    from sparsify.recipes.config import build_parser

    text = build_parser().format_help()
    for flag in ("--volumes", "--intensity", "--small-volumes", "--volume-cache", "DxHxW", "ct:lung"):
        assert flag in text
    assert "volumes (--volumes without --data)" in text and "scans (--data with volumes)" in text


def test_volume_knn_monitor_reads_class_folders(tmp_path: Path) -> None:
    from sparsify.recipes.knn import KnnMonitor
    from sparsify.recipes.scan_run import read_knn_volumes

    import sparsify

    root = _class_folders(tmp_path / "knn", per_class=5, size=18)
    (root / "noise" / "broken.npy").write_bytes(b"not an array")
    reader = functools.partial(read_knn_volumes, intensity="none")
    mon = KnnMonitor(root, (16, 16, 16), 1, None, None, k=3, batch=4, reader=reader)
    assert mon.bank.shape == (10, 1, 16, 16, 16)  # the damaged file is skipped
    assert mon.bank_labels.tolist() == [0] * 5 + [1] * 5
    torch.manual_seed(0)
    enc = sparsify.wrap(small_resnet3d(), input_size=(16, 16, 16))
    acc = mon.evaluate(enc, torch.device("cpu"))
    # a bright centred blob against noise: even random 3-D features separate them
    assert acc == pytest.approx(1.0)


@pytest.mark.slow
def test_small_volumes_refuse_names_the_file(tmp_path: Path, capsys) -> None:
    data = tmp_path / "scans"
    data.mkdir()
    np.save(data / "big.npy", np.random.default_rng(0).normal(size=(40, 40, 40)).astype(np.float32))
    np.save(data / "tiny.npy", np.zeros((4, 40, 40), np.float32))
    args = ["--data", str(data), "--input-size", "32", "--model", SMALL_RESNET3D, "--steps", "1", "--batch-size", "2",
            "--decoder-width", "8", "--workers", "0", "--no-tensorboard", "--out", str(tmp_path / "run")]  # fmt: skip
    code, _, err = run_pretrain([*args, "--small-volumes", "refuse"], capsys)
    assert code == 2 and "smaller than the crop 32x32x32" in err and "tiny.npy" in err and "--small-volumes pad" in err
    from _recipe_helpers import TINY

    code, _, err = run_pretrain([*args, "--model", TINY], capsys)  # a 2-D network on volumes
    assert code == 2 and "is not a 3-D network (its first convolution is Conv2d)" in err and "holds volumes" in err


@pytest.mark.slow
@pytest.mark.parametrize("family", ["monai", "nnunet"])
def test_backbone_loads_strictly_into_monai_and_nnunet_encoders(family: str, tmp_path: Path) -> None:
    """What users of 3-D code load a pretrained encoder into: MONAI's resnet10 without its head, nnU-Net's
    residual encoder (an anisotropic plan). The export takes every tensor, so a strict load succeeds."""
    import sparsify
    from sparsify.spark.export import backbone_metadata, load_backbone

    if family == "monai":
        nets = pytest.importorskip("monai.networks.nets")
        make = functools.partial(nets.resnet10, spatial_dims=3, n_input_channels=1, feed_forward=False)
        size = (32, 32, 32)
    else:
        pytest.importorskip("dynamic_network_architectures")
        from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
        from torch import nn

        make = functools.partial(
            ResidualEncoder, 1, 3, [8, 16, 32], nn.Conv3d, 3, [[1, 1, 1], [1, 2, 2], [2, 2, 2]], [1, 1, 1],
            conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
            nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, return_skips=True,
        )  # fmt: skip
        size = (8, 16, 16)
    torch.manual_seed(0)
    enc = sparsify.wrap(make(), input_size=size)
    spark = sparsify.SparK(enc, decoder_width=16)
    with torch.no_grad():  # weights unlike a fresh network's, as after pretraining
        for p in enc.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = sparsify.export_backbone(spark, tmp_path / "b.safetensors", metadata={"spatial_rank": 3, "crop": list(size)})
    meta = backbone_metadata(path)
    assert meta["left_out"] == [] and meta["spatial_rank"] == 3 and meta["crop"] == list(size)
    fresh = make()
    fresh.load_state_dict(load_backbone(path), strict=True)
    for name, value in enc.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_resume_check_reads_a_3d_size_in_its_own_rank(tmp_path: Path) -> None:
    from sparsify.recipes import pretrain
    from sparsify.recipes.resume import check_resume

    keys, notice = pretrain.SHAPE_KEYS, pretrain.NOTICE_KEYS
    saved = {"model": SMALL_RESNET3D, "input_size": [16, 16, 16], "volumes": True, "intensity": "percentile"}
    assert check_resume(tmp_path, {"input_size": "16", "volumes": True}, saved, {}, keys, notice) == []
    assert check_resume(tmp_path, {"input_size": "16x16x16"}, saved, {}, keys, notice) == []
    for wrong in ("32", "16x16", "16x16x32"):
        with pytest.raises(RecipeError, match="--input-size"):
            check_resume(tmp_path, {"input_size": wrong}, saved, {}, keys, notice)
    notes = check_resume(tmp_path, {"intensity": "ct:soft"}, saved, {}, keys, notice)
    assert notes == ["note: --intensity changes from percentile (the checkpoint's) to ct:soft for the rest of this run"]
