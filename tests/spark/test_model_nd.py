"""SparK on 1-D and 3-D stand-in encoders: shapes, learning, gradients, the mse option, a mask patch finer
than the downsample ratio, reconstructions, checkpoints and the construction/input errors."""

from __future__ import annotations

import pytest
import torch

from sparsify._geometry import per_axis
from sparsify.errors import SparsifyError
from sparsify.spark import SparK
from sparsify.spark._patches import patchify, repeat_mask, unpatchify
from sparsify.spark.loss import masked_mse_loss, masked_patch_loss

from .toy_encoder import ToyEncoder

# (spatial_dims, strides, input size): a video-like 3-D pyramid with a (1, 2, 2) stem, an isotropic
# 3-D one, and a 1-D signal pyramid
CASES = {
    "video": (3, [(1, 2, 2), (2, 4, 4), (4, 8, 8)], (8, 16, 24)),
    "volume": (3, [2, 4, 8], (8, 16, 8)),
    "signal": (1, [4, 8, 16], (64,)),
}


def _spark(case: str, in_chans: int = 1, norm_type: str | None = "batch", seed: int = 0, **kw) -> SparK:
    rank, strides, _ = CASES[case]
    patch = kw.pop("patch_size", None)
    torch.manual_seed(seed)
    enc = ToyEncoder(in_chans, [4 * 2**i for i in range(len(strides))], strides, norm_type, rank, patch)
    return SparK(enc, decoder_width=16, **kw)


def _smooth(b: int, c: int, size: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Smooth random inputs: learnable structure, unlike white noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(b, c, *(max(1, s // 4) for s in size), generator=g)
    mode = {1: "linear", 3: "trilinear"}[len(size)]
    return torch.nn.functional.interpolate(low, size=size, mode=mode, align_corners=False)


@pytest.mark.parametrize("case", CASES)
def test_predict_has_the_input_shape_and_every_parameter_gets_a_gradient(case):
    spark = _spark(case, in_chans=2)
    size = CASES[case][2]
    x = _smooth(2, 2, size)
    assert spark.spatial_dims == CASES[case][0]
    mask = spark.draw_mask(x, torch.Generator().manual_seed(0))
    patch = per_axis(spark.patch_size, len(size))
    assert mask.shape[2:] == tuple(s // r for s, r in zip(size, patch))
    assert spark.predict(x, mask).shape == x.shape
    loss = spark(x, mask=mask)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in spark.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize(("case", "loss"), [("video", "spark"), ("signal", "spark"), ("volume", "mse")])
def test_loss_falls_on_a_fixed_batch(case, loss):
    spark = _spark(case, in_chans=1, loss=loss)
    x = _smooth(2, 1, CASES[case][2])
    mask = spark.draw_mask(x, torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(spark.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        value = spark(x, mask=mask)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("case", CASES)
def test_prediction_ignores_masked_voxels_even_non_finite_ones(case):
    spark = _spark(case).eval()
    x = _smooth(2, 1, CASES[case][2])
    mask = spark.draw_mask(x, torch.Generator().manual_seed(2))
    hidden = ~repeat_mask(mask, x.shape[2:])
    garbage = torch.where(hidden, torch.full_like(x, float("nan")), x)
    torch.testing.assert_close(spark.predict(garbage, mask), spark.predict(x, mask))


def test_the_mse_option_is_plain_masked_mse_and_reconstructs_in_input_units():
    spark = _spark("volume", loss="mse").eval()
    x = _smooth(2, 1, CASES["volume"][2])
    mask = spark.draw_mask(x, torch.Generator().manual_seed(3))
    pred = spark.predict(x, mask)
    torch.testing.assert_close(spark(x, mask=mask), masked_mse_loss(pred, x, mask, spark.patch_size))
    out = spark.reconstruct(x, mask)
    torch.testing.assert_close(out["reconstruction"], pred)  # no per-patch denormalisation
    default = _spark("volume").eval()
    torch.testing.assert_close(
        default(x, mask=mask), masked_patch_loss(default.predict(x, mask), x, mask, default.patch_size)
    )
    with pytest.raises(SparsifyError, match="loss='l1'"):
        _spark("volume", loss="l1")


def test_a_mask_patch_finer_than_the_downsample_ratio_sets_the_grid_and_the_loss_patch():
    # nnssl's choice: 16^3 blocks on a stride-32 network; here patch 2 on a stride-8 volume pyramid
    spark = _spark("volume", patch_size=2)
    assert spark.downsample_ratio == 8 and spark.patch_size == 2
    x = _smooth(2, 1, (8, 16, 8))
    mask = spark.draw_mask(x, torch.Generator().manual_seed(4))
    assert mask.shape == (2, 1, 4, 8, 4)
    pred = spark.predict(x, mask)
    torch.testing.assert_close(spark(x, mask=mask), masked_patch_loss(pred, x, mask, 2))
    # masked voxels still cannot influence the prediction
    hidden = ~repeat_mask(mask, x.shape[2:])
    spark.eval()
    torch.testing.assert_close(spark.predict(torch.where(hidden, x + 50, x), mask), spark.predict(x, mask))
    # inputs must still fit the network's stride, not only the patch
    with pytest.raises(SparsifyError, match="multiple of the downsample ratio 8"):
        spark(torch.randn(1, 1, 8, 16, 12))


@pytest.mark.parametrize("case", CASES)
def test_reconstruct_returns_volumes_and_signals(case):
    spark = _spark(case).eval()
    x = _smooth(2, 1, CASES[case][2])
    mask = spark.draw_mask(x, torch.Generator().manual_seed(5))
    out = spark.reconstruct(x, mask)
    for k in ("input", "masked", "reconstruction", "composite"):
        assert out[k].shape == x.shape and torch.isfinite(out[k]).all()
    pix = out["mask"].expand_as(x)
    assert out["mask"].shape == (2, 1, *x.shape[2:])
    assert torch.equal(out["composite"][pix], x[pix])
    assert torch.equal(out["composite"][~pix], out["reconstruction"][~pix])


def test_reconstruction_of_a_perfect_prediction_is_the_input_in_3d(monkeypatch):
    spark = _spark("video").eval()
    x = _smooth(2, 1, CASES["video"][2])
    p = spark.patch_size
    t = patchify(x, p)
    perfect = unpatchify((t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt(), p, 1, (2, 2, 3))
    monkeypatch.setattr(spark, "predict", lambda x_, m_: perfect)
    out = spark.reconstruct(x, spark.draw_mask(x))
    torch.testing.assert_close(out["reconstruction"], x, atol=1e-5, rtol=1e-5)


def test_nd_state_dict_round_trip_and_mismatches(tmp_path):
    a = _spark("video")
    x = _smooth(2, 1, CASES["video"][2])
    a(x).backward()
    torch.save(a.state_dict(), tmp_path / "a.pth")
    sd = torch.load(tmp_path / "a.pth", weights_only=True)
    assert sd["_extra_state"]["spatial_dims"] == 3
    b = _spark("video", seed=1)
    b.load_state_dict(sd)
    a.eval()
    b.eval()
    mask = a.draw_mask(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a(x, mask=mask), b(x, mask=mask))
    for other in (dict(loss="mse"), dict(patch_size=(2, 4, 4))):
        with pytest.raises(SparsifyError, match="different hyper-parameters"):
            _spark("video", **other).load_state_dict(sd)


def test_a_2d_checkpoint_from_before_nd_support_still_loads():
    enc = ToyEncoder(3, (8, 16), (4, 8), "batch")
    spark = SparK(enc, decoder_width=16)
    sd = spark.state_dict()
    for key in ("spatial_dims", "patch_size", "loss"):  # what older versions did not record
        del sd["_extra_state"][key]
    SparK(ToyEncoder(3, (8, 16), (4, 8), "batch"), decoder_width=16).load_state_dict(sd)


def test_input_errors_name_the_rank_and_the_sizes_that_fit():
    spark = _spark("video")
    with pytest.raises(SparsifyError, match=r"volume batch \(B, C, D, H, W\).*encoder is 3-D, the batch is 2-D"):
        spark(torch.randn(1, 1, 16, 24))
    fits = r"8x16x20 is not a positive multiple of the downsample ratio \(4, 8, 8\).*8x16x16"
    with pytest.raises(SparsifyError, match=fits):
        spark(torch.randn(1, 1, 8, 16, 20))
    with pytest.raises(SparsifyError, match=r"signal batch \(B, C, L\)"):
        _spark("signal")(torch.randn(1, 1, 8, 8))
    x = torch.randn(2, 1, 8, 16, 24)
    with pytest.raises(SparsifyError, match="spatial dimensions where the input has 3"):
        spark(x, mask=torch.zeros(2, 1, 2, 3, dtype=torch.bool))
    with pytest.raises(SparsifyError, match="mask has shape"):
        spark(x, mask=torch.zeros(2, 1, 2, 2, 2, dtype=torch.bool))
    with pytest.raises(SparsifyError, match="masks no patch of a 1x1x1 patch grid"):
        spark(torch.randn(1, 1, 4, 8, 8))


def test_encoder_mismatches_are_clear_errors():
    def enc(**kw):
        base = dict(in_chans=1, channels=(4, 8), strides=[(1, 2, 2), (2, 4, 4)], spatial_dims=3)
        base.update(kw)
        return ToyEncoder(**base)

    bad = enc()
    bad.spatial_dims = 4
    with pytest.raises(SparsifyError, match="spatial_dims=4"):
        SparK(bad)
    bad = enc()
    bad.feature_strides = [(1, 2), (2, 4)]
    with pytest.raises(SparsifyError, match="one entry per spatial axis"):
        SparK(bad)
    bad = enc()
    bad.downsample_ratio = (2, 4, 8)
    with pytest.raises(SparsifyError, match="downsample_ratio"):
        SparK(bad)
    with pytest.raises(SparsifyError, match=r"patch_size \(2, 3, 4\) must divide"):
        SparK(enc(patch_size=(2, 3, 4)))
    bad = enc()
    del bad.spatial_dims  # an old encoder: 2-D by default, so its 3-D strides do not fit
    with pytest.raises(SparsifyError, match="is 2-D"):
        SparK(bad)


def test_3d_spark_compiles_in_one_graph_and_runs_under_bf16_autocast():
    case = "video"
    spark = _spark(case, in_chans=1)
    x = _smooth(2, 1, CASES[case][2])
    mask = spark.draw_mask(x, torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(spark)(x, mask, check_mask=False)
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = spark(x)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in spark.parameters())
