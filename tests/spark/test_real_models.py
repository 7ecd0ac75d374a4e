"""SparK on real timm networks wrapped by sparsify.wrap: gradients, learning, masked-pixel invariance,
export into a fresh model, bf16 autocast."""

from __future__ import annotations

import pytest
import timm
import torch

import sparsify
from sparsify.spark import SparK, export_backbone, load_backbone
from sparsify.spark._patches import repeat_mask

pytestmark = pytest.mark.slow

SIZE = (64, 96)  # non-square: a 2 x 3 patch grid at R = 32
CASES = [("resnet18", 1), ("resnet18", 3), ("convnext_atto", 1), ("convnext_atto", 3)]
IDS = [f"{n}-c{c}" for n, c in CASES]


def _build(name: str, in_chans: int, seed: int = 0, **kw) -> tuple[torch.nn.Module, torch.nn.Module, SparK]:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, in_chans=in_chans, **kw)
    enc = sparsify.wrap(model, input_size=SIZE)
    spark = SparK(enc, decoder_width=128)
    return model, enc, spark


def _images(b: int, c: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images: learnable structure, unlike white noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(b, c, SIZE[0] // 16, SIZE[1] // 16, generator=g)
    return torch.nn.functional.interpolate(low, size=SIZE, mode="bicubic", align_corners=False)


def _mask(b: int, seed: int = 0) -> torch.Tensor:
    return sparsify.random_mask(b, (SIZE[0] // 32, SIZE[1] // 32), 0.6, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("name", "in_chans"), CASES, ids=IDS)
def test_loss_finite_every_encoder_parameter_gets_gradient_and_loss_falls(name, in_chans):
    # timm zero-initialises the last BN of each residual block, which zeroes the gradient of the rest
    # of the block at step 0; switch that off so "every parameter gets a gradient" is a real check.
    kw = {"zero_init_last": False} if name.startswith("resnet") else {}
    _, enc, spark = _build(name, in_chans, **kw)
    x = _images(2, in_chans)
    mask = _mask(2)

    loss = spark(x)  # random mask
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for pname, p in enc.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"

    opt = torch.optim.AdamW(spark.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(30):
        loss = spark(x, mask=mask)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = float(spark(x, mask=mask))
    assert last <= 0.7 * first, f"loss {first:.4f} -> {last:.4f}: less than a 30% drop in 30 steps"


@pytest.mark.parametrize(("name", "in_chans", "train"), [(*CASES[0], True), (*CASES[3], False)], ids=IDS[::3])
def test_prediction_ignores_pixels_inside_masked_patches(name, in_chans, train):
    _, _, spark = _build(name, in_chans)
    spark.train(train)
    x = _images(2, in_chans)
    mask = _mask(2, 1)
    noisy = torch.where(repeat_mask(mask, SIZE), x, torch.randn_like(x) * 5)
    with torch.no_grad():
        torch.testing.assert_close(spark.predict(x, mask), spark.predict(noisy, mask), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("name", "in_chans", "suffix"), [(*CASES[0], ".safetensors"), (*CASES[3], ".pth")], ids=IDS[::3]
)
def test_exported_weights_load_strictly_into_a_fresh_model(tmp_path, name, in_chans, suffix):
    model, enc, spark = _build(name, in_chans)
    with torch.no_grad():  # move weights and BN statistics away from any fresh initialisation
        for t in enc.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.rand_like(t) * 0.1)
    path = export_backbone(spark, tmp_path / f"backbone{suffix}")
    state = load_backbone(path)
    assert set(state) == set(enc.state_dict())

    torch.manual_seed(123)
    fresh = timm.create_model(name, pretrained=False, in_chans=in_chans)
    result = fresh.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    head = set(fresh.state_dict()) - set(state)
    assert set(result.missing_keys) == head and head, head
    assert all(k.startswith(("fc.", "head.")) for k in head), head
    fresh.load_state_dict({**fresh.state_dict(), **state}, strict=True)  # strict apart from the head

    x = _images(2, in_chans)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        ref = enc.dense_encoder()(x)
        got = sparsify.wrap(fresh, input_size=SIZE).dense_encoder()(x)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b)


def test_timm_one_liner_loads_an_export(tmp_path):
    _, enc, spark = _build("resnet18", 1)
    path = export_backbone(spark, tmp_path / "backbone.safetensors")
    fresh = timm.create_model(
        "resnet18", pretrained=True, in_chans=1, num_classes=10, pretrained_cfg_overlay=dict(file=str(path))
    )
    for k, v in enc.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_bf16_autocast_on_cpu(name):
    _, enc, spark = _build(name, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = spark(_images(2, 3))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in enc.parameters())


def test_torchvision_model_export_loads_into_a_fresh_one(tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    spark = SparK(sparsify.wrap(model, input_size=SIZE), decoder_width=64)
    spark(_images(2, 3)).backward()
    path = export_backbone(spark, tmp_path / "tv.pth")
    fresh = torchvision.models.resnet18(weights=None)
    result = fresh.load_state_dict(load_backbone(path), strict=False)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and result.unexpected_keys == []
    for k, v in fresh.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, model.state_dict()[k]), k
