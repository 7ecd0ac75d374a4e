"""The SparK module on a small stand-in encoder (real networks: test_real_models.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparsify.errors import SparsifyError
from sparsify.spark import SparK
from sparsify.spark._patches import patchify, repeat_mask, unpatchify
from sparsify.spark.densify import MaskedBatchNorm2d

from .toy_encoder import ToyEncoder


def _spark(in_chans=3, strides=(4, 8, 16, 32), norm_type="batch", width=32, **kw) -> SparK:
    torch.manual_seed(0)
    chans = [8 * 2**i for i in range(len(strides))]
    return SparK(ToyEncoder(in_chans, chans, strides, norm_type), decoder_width=width, **kw)


def _mask(b, gh, gw, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, 1, gh, gw, generator=g) < 0.5
    m[:, :, 0, 0] = True
    m[:, :, -1, -1] = False
    return m


def test_forward_returns_finite_scalar_and_trains_everything():
    spark = _spark()
    x = torch.randn(2, 3, 64, 96)
    loss = spark(x)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in spark.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


PYRAMIDS = [(4, 8, 16, 32), (2, 4, 8, 16, 32), (8, 16, 32), (4, 8, 16), (7,)]


@pytest.mark.parametrize("strides", PYRAMIDS, ids=str)
@pytest.mark.parametrize("in_chans", [1, 4])
def test_predict_shape_for_every_pyramid(strides, in_chans):
    spark = _spark(in_chans=in_chans, strides=strides, width=16)
    r = strides[-1]
    x = torch.randn(2, in_chans, 2 * r, 3 * r)
    mask = _mask(2, 2, 3)
    assert spark.predict(x, mask).shape == x.shape
    assert torch.isfinite(spark(x, mask=mask))


def test_densify_norm_auto_follows_encoder():
    assert isinstance(_spark(norm_type="batch").densify[0].norm, MaskedBatchNorm2d)
    assert isinstance(_spark(norm_type="layer").densify[0].norm, nn.LayerNorm)
    assert isinstance(_spark(norm_type=None).densify[0].norm, nn.LayerNorm)
    assert isinstance(_spark(norm_type="batch", densify_norm="layer").densify[0].norm, nn.LayerNorm)
    assert _spark(densify_norm="none").densify_norm == "none"


def test_densify_widths_and_kernels():
    spark = _spark(width=64)  # encoder widths 64, 32, 16, 8 (coarse first) match the decoder's
    # as in the official SparK: identity only at the coarsest scale; finer scales keep their 3x3
    assert isinstance(spark.densify[0].proj, nn.Identity)
    assert all(d.proj.kernel_size == (3, 3) for d in spark.densify[1:])
    assert [d.proj.out_channels for d in spark.densify[1:]] == [32, 16, 8]
    spark = _spark(width=128)
    assert spark.densify[0].proj.kernel_size == (1, 1)
    assert spark.densify[0].proj.out_channels == 128
    assert all(d.proj.kernel_size == (3, 3) for d in spark.densify[1:])
    assert [d.proj.out_channels for d in spark.densify] == [128, 64, 32, 16]


@pytest.mark.parametrize("train", [True, False])
def test_prediction_ignores_pixels_inside_masked_patches(train):
    spark = _spark().train(train)
    x = torch.randn(2, 3, 64, 96)
    mask = _mask(2, 2, 3)
    pix = repeat_mask(mask, x.shape[-2:])
    x2 = torch.where(pix, x, torch.randn_like(x) * 10)
    torch.testing.assert_close(spark.predict(x, mask), spark.predict(x2, mask))


def test_loss_with_explicit_mask_is_deterministic_and_nothing_masked_is_refused():
    spark = _spark().eval()
    x = torch.randn(2, 3, 64, 96)
    mask = _mask(2, 2, 3)
    assert torch.equal(spark(x, mask=mask), spark(x, mask=mask))
    with pytest.raises(SparsifyError, match="nothing is masked"):
        spark(x, mask=torch.ones(2, 1, 2, 3, dtype=torch.bool))
    # check_mask=False (the recipes' masks always mask a patch) skips the host read: same loss, and
    # an all-visible mask then gives 0 (no masked patch is counted) instead of the error.
    assert torch.equal(spark(x, mask=mask, check_mask=False), spark(x, mask=mask))
    assert spark(x, mask=torch.ones(2, 1, 2, 3, dtype=torch.bool), check_mask=False).item() == 0.0


def test_random_masks_are_fresh_exact_and_reproducible():
    spark = _spark(mask_ratio=0.6)
    x = torch.randn(3, 3, 128, 160)  # 4 x 5 = 20 patches, 8 visible
    m1, m2 = spark.draw_mask(x), spark.draw_mask(x)
    assert m1.shape == (3, 1, 4, 5) and m1.dtype == torch.bool
    assert (m1.flatten(1).sum(1) == 8).all()
    assert not torch.equal(m1, m2)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(spark.draw_mask(x, g1), spark.draw_mask(x, g2))
    spark.eval()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(spark(x, generator=g1), spark(x, generator=g2))


def test_mask_ratio_that_masks_nothing_is_refused():
    spark = _spark(mask_ratio=0.1)
    with pytest.raises(SparsifyError, match="masks no patch"):
        spark(torch.randn(1, 3, 64, 64))  # 2 x 2 grid: round(4 * 0.9) = 4 visible


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1, "0.6"])
def test_bad_mask_ratio(ratio):
    with pytest.raises(SparsifyError, match="mask_ratio"):
        _spark(mask_ratio=ratio)


def test_input_and_mask_validation():
    spark = _spark()
    with pytest.raises(SparsifyError, match="channels"):
        spark(torch.randn(1, 1, 64, 64))
    with pytest.raises(SparsifyError, match="multiple of the downsample ratio 32"):
        spark(torch.randn(1, 3, 64, 80))
    with pytest.raises(SparsifyError, match="floating-point"):
        spark(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(SparsifyError, match=r"\(B, C, H, W\)"):
        spark(torch.randn(3, 64, 64))
    x = torch.randn(2, 3, 64, 96)
    with pytest.raises(SparsifyError, match="bool"):
        spark(x, mask=torch.ones(2, 1, 2, 3))
    with pytest.raises(SparsifyError, match="shape"):
        spark(x, mask=torch.ones(2, 1, 3, 2, dtype=torch.bool))


def test_non_encoder_is_refused():
    with pytest.raises(SparsifyError, match="sparsify.wrap"):
        SparK(nn.Conv2d(3, 8, 3))
    with pytest.raises(SparsifyError, match="sparsify.wrap"):
        SparK("resnet50")
    enc = ToyEncoder()
    enc.downsample_ratio = 16
    with pytest.raises(SparsifyError, match="downsample_ratio"):
        SparK(enc)


def test_reconstruct_outputs():
    spark = _spark().eval()
    x = torch.randn(2, 3, 64, 96)
    mask = _mask(2, 2, 3)
    out = spark.reconstruct(x, mask)
    assert {"input", "masked", "reconstruction", "composite", "mask"} <= set(out)
    for k in ("input", "masked", "reconstruction", "composite"):
        assert out[k].shape == x.shape and torch.isfinite(out[k]).all()
    pix = out["mask"].expand_as(x)
    assert torch.equal(out["composite"][pix], x[pix])
    assert torch.equal(out["composite"][~pix], out["reconstruction"][~pix])
    assert (out["masked"][~pix] == 0).all() and torch.equal(out["masked"][pix], x[pix])
    assert not out["reconstruction"].requires_grad
    assert spark.reconstruct(x)["input"].shape == x.shape  # random mask


def test_reconstruction_denormalises_with_input_patch_statistics(monkeypatch):
    """A perfect normalised prediction reconstructs the input exactly."""
    spark = _spark().eval()
    x = torch.randn(2, 3, 64, 96)
    t = patchify(x, 32)
    normed = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    perfect = unpatchify(normed, 32, 3, (2, 3))
    monkeypatch.setattr(spark, "predict", lambda x_, m_: perfect)
    out = spark.reconstruct(x, _mask(2, 2, 3))
    torch.testing.assert_close(out["reconstruction"], x, atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip():
    a = _spark()
    x = torch.randn(2, 3, 64, 96)
    a(x).backward()  # move running statistics
    sd = a.state_dict()
    assert "_extra_state" in sd and sd["_extra_state"]["decoder_width"] == 32
    b = _spark()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    b.load_state_dict(sd)  # strict
    a.eval()
    b.eval()
    mask = _mask(2, 2, 3)
    torch.testing.assert_close(a(x, mask=mask), b(x, mask=mask))


def test_state_dict_round_trip_through_torch_save_weights_only(tmp_path):
    a = _spark()
    torch.save(a.state_dict(), tmp_path / "spark.pth")
    sd = torch.load(tmp_path / "spark.pth", weights_only=True)
    _spark().load_state_dict(sd)


@pytest.mark.parametrize(
    "other",
    [dict(width=64), dict(densify_norm="layer"), dict(in_chans=1), dict(strides=(4, 8, 16))],
    ids=["decoder_width", "densify_norm", "in_chans", "pyramid"],
)
def test_hyper_parameter_mismatch_is_a_clear_error(other):
    sd = _spark().state_dict()
    with pytest.raises(SparsifyError, match="different hyper-parameters"):
        _spark(**other).load_state_dict(sd)


def test_runs_under_bf16_autocast_on_cpu():
    spark = _spark()
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = spark(x)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in spark.parameters())


def test_fullgraph_compile_traces_without_breaks():
    """Dynamo traces the whole model in one graph (no .item(), no data-dependent shapes)."""
    torch._dynamo.reset()
    spark = SparK(ToyEncoder(3, (8, 16), (4, 8), "batch"), decoder_width=16).eval()
    compiled = torch.compile(spark, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 32, 48)
    mask = _mask(2, 4, 6)
    torch.testing.assert_close(compiled(x, mask=mask), spark(x, mask=mask))
    assert torch.isfinite(compiled(x))
