"""SparK on real wrapped 1-D and 3-D networks (sparsify.wrap of unmodified hand-written CNNs): learning,
gradients, masked voxels ignored, per-axis decoder plans, a finer mask patch with stride-1 skips and the
mse loss (nnssl's options), pictures and the export header."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_nd import ResEncoder3d, ResNet1d, Volume3d

import sparsify
from sparsify.spark import SparK, backbone_metadata, export_backbone, save_reconstructions
from sparsify.spark._patches import repeat_mask

pytestmark = pytest.mark.slow


def _smooth(b: int, c: int, size: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(b, c, *(max(1, s // 4) for s in size), generator=g)
    mode = {1: "linear", 3: "trilinear"}[len(size)]
    return torch.nn.functional.interpolate(low, size=size, mode=mode, align_corners=False)


def _train(spark: SparK, x: torch.Tensor, steps: int = 30, lr: float = 3e-3) -> list[float]:
    mask = spark.draw_mask(x, torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(spark.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = spark(x, mask=mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


#: Every skip of the residual encoder, from stride 1 (nnssl decodes from the UNet's own skips).
_ALL_SKIPS = [f"stages_{i}_act" for i in range(4)]

CASES = {
    # name: (model factory, input size, wrap kwargs, SparK kwargs, in_chans)
    "volume-anisotropic": (Volume3d, (8, 32, 32), {}, {}, 1),
    "resnet1d": (ResNet1d, (256,), {}, {}, 2),
    "resenc-nnssl": (ResEncoder3d, (8, 32, 32), dict(patch_size=(2, 4, 4), stages=_ALL_SKIPS), dict(loss="mse"), 1),
}


def _build(case: str):
    factory, size, wrap_kw, spark_kw, c = CASES[case]
    torch.manual_seed(0)
    model = factory()
    enc = sparsify.wrap(model, size, **wrap_kw)
    return model, enc, SparK(enc, decoder_width=32, **spark_kw), size, c


@pytest.mark.parametrize("case", CASES)
def test_every_encoder_parameter_learns_and_the_loss_falls(case):
    _, enc, spark, size, c = _build(case)
    x = _smooth(2, c, size)
    loss = spark(x)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    losses = _train(spark, x)
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("case", CASES)
def test_masked_voxels_cannot_reach_the_prediction(case):
    _, _, spark, size, c = _build(case)
    spark.eval()
    x = _smooth(2, c, size)
    mask = spark.draw_mask(x, torch.Generator().manual_seed(2))
    hidden = ~repeat_mask(mask, size)
    torch.testing.assert_close(spark.predict(torch.where(hidden, torch.full_like(x, float("nan")), x), mask),
                               spark.predict(x, mask))


def test_plans_follow_the_networks_per_axis_strides():
    _, enc, spark, _, _ = _build("volume-anisotropic")
    assert spark.spatial_dims == 3 and spark.feature_strides == [(2, 4, 4), (4, 8, 8), (4, 16, 16)]
    assert spark.decoder.steps == [(1, 2, 2), 2, 2, (1, 2, 2)]
    assert spark.densify[0].mask_token.shape == (1, enc.feature_channels[-1], 1, 1, 1)
    # nnssl's options: a 2x4x4 mask patch on a (4, 8, 8)-stride encoder whose skips start at stride 1
    _, enc, spark, size, _ = _build("resenc-nnssl")
    assert spark.patch_size == (2, 4, 4) and spark.downsample_ratio == (4, 8, 8)
    assert spark.feature_strides[0] == 1 and spark.loss == "mse"
    assert spark.draw_mask(torch.zeros(1, 1, *size)).shape == (1, 1, 4, 8, 8)


def test_a_volume_reconstruction_picture_and_the_export_header(tmp_path):
    _, enc, spark, size, c = _build("volume-anisotropic")
    x = _smooth(2, c, size)
    _train(spark, x, steps=5)
    spark.eval()
    out = spark.reconstruct(x, spark.draw_mask(x, torch.Generator().manual_seed(3)))
    path = save_reconstructions(out, tmp_path / "recon.png", columns=("input", "masked", "reconstruction",
                                                                     "composite"), labels=True)
    img = np.asarray(Image.open(path))
    assert img.ndim == 3 and img.shape[0] > 200 and img.std() > 10  # a real picture, not a blank
    meta = backbone_metadata(export_backbone(spark, tmp_path / "b.safetensors"))
    assert meta["spatial_dims"] == 3 and meta["patch_size"] == (4, 16, 16)
    assert [s["stride"] for s in meta["stages"]] == [st.stride for st in enc.stages]
