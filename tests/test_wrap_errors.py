"""No raw crashes: extra forward arguments, pickling, misuse and sizes that do not fit get clear errors."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsify
from sparsify import SparsifyError
from sparsify.testing import capture_module_outputs


class WithExtras(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.body = nn.Conv2d(8, 8, 3, 2, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, scale: float = 1.0, return_features: bool = False):
        x = self.body(F.relu(self.stem(x) * scale))
        if return_features:
            return [x]
        return self.fc(x.mean((2, 3)))


class Required(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)

    def forward(self, x: torch.Tensor, gain: float) -> torch.Tensor:
        return self.conv(x) * gain


class BranchesOnValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.sum() > 0 else -y


class BranchesOnMode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * 0.5 if self.training else y


def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1))


@pytest.fixture
def fp64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_extra_arguments_are_traced_at_their_defaults(fp64):
    model = WithExtras()
    enc = sparsify.wrap(model, (32, 32))
    x = torch.randn(2, 3, 32, 32)
    want = capture_module_outputs(model, x, ["body"], train=False)["body"]
    torch.testing.assert_close(enc.eval()(x)[-1], want)


def test_concrete_args_fix_other_values(fp64):
    model = WithExtras()
    enc = sparsify.wrap(model, (32, 32), concrete_args={"scale": 0.5, "return_features": True})
    x = torch.randn(2, 3, 32, 32)
    want = capture_module_outputs(model, x, ["body"], train=False, kwargs={"scale": 0.5})["body"]
    torch.testing.assert_close(enc.eval()(x)[-1], want)
    sparsify.verify(enc)  # the ground truth runs the model with the same fixed arguments


def test_required_and_unknown_arguments_are_named():
    with pytest.raises(sparsify.SparsifyError, match="required argument 'gain'.*concrete_args=\\{'gain': value\\}"):
        sparsify.wrap(Required(), (32, 32))
    enc = sparsify.wrap(Required(), (32, 32), concrete_args={"gain": 2.0})
    assert enc(torch.randn(1, 3, 32, 32))[-1].shape == (1, 8, 16, 16)
    with pytest.raises(sparsify.SparsifyError, match="does not take"):
        sparsify.wrap(WithExtras(), (32, 32), concrete_args={"scael": 2.0})


def test_root_level_control_flow_never_suggests_the_root_as_leaf():
    with pytest.raises(sparsify.SparsifyError, match="BranchesOnValues.forward itself") as info:
        sparsify.wrap(BranchesOnValues(), (32, 32))
    assert "leaf_modules=[BranchesOnValues]" not in str(info.value)
    assert "concrete_args" in str(info.value)
    with pytest.raises(sparsify.SparsifyError, match="BranchesOnMode.forward itself") as info:
        sparsify.wrap(BranchesOnMode(), (32, 32))
    assert "leaf_modules=[<that module" not in str(info.value)


def test_pickle_torch_save_and_deepcopy_of_whole_modules(fp64):
    enc = sparsify.wrap(_small(), (32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = sparsify.random_mask(2, (8, 8), 0.5, generator=torch.Generator().manual_seed(0))
    want = enc(x, mask)[-1]
    for clone in (pickle.loads(pickle.dumps(enc)), copy.deepcopy(enc)):
        torch.testing.assert_close(clone.eval()(x, mask)[-1], want)
        torch.testing.assert_close(clone.dense_encoder()(x)[-1], enc.dense_encoder()(x)[-1])
    spark = sparsify.SparK(enc, decoder_width=16).eval()
    buf = io.BytesIO()
    torch.save(spark, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x, mask=mask), spark(x, mask=mask))
    pickle.dumps(enc.dense_encoder())


def test_misuse_gets_clear_errors():
    model = _small()
    enc = sparsify.wrap(model, (32, 32))
    with pytest.raises(sparsify.SparsifyError, match="already made by sparsify.wrap"):
        sparsify.wrap(enc, (32, 32))
    with pytest.raises(sparsify.SparsifyError, match="already made by sparsify.wrap"):
        sparsify.wrap(sparsify.SparK(enc, decoder_width=16), (32, 32))
    for bad in (-32, 0, (32, -32), (32.0, 32), "32"):
        with pytest.raises(sparsify.SparsifyError, match="input_size"):
            sparsify.wrap(model, bad)
    x = torch.randn(2, 3, 32, 32)
    meta = torch.ones(2, 1, 8, 8, dtype=torch.bool, device="meta")
    with pytest.raises(sparsify.SparsifyError, match="meta"):
        enc(x, meta)


@pytest.mark.parametrize("size, advice", [((100, 100), "96x96 or 128x128"), ((70, 70), "64x64 or 96x96")])
def test_input_size_error_states_the_true_total_stride(size, advice):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(sparsify.SparsifyError, match=f"downsample ratio 32 .*{advice}"):
        sparsify.wrap(model, size)
    enc = sparsify.wrap(model, (int(advice[:2]), int(advice[:2])))  # following the advice works
    assert enc.downsample_ratio == 32
    with pytest.raises(sparsify.SparsifyError, match="downsample ratio 16 "):  # stages ending at stride 16
        sparsify.wrap(model, size, stages=["layer1", "layer2", "layer3"])


def test_unpadded_first_layer_is_refused_with_the_reason():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 0), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 2, 1))
    with pytest.raises(sparsify.SparsifyError, match="never line up with the patch grid: node '_0'") as info:
        sparsify.wrap(model, (32, 32))
    assert "padding" in str(info.value)


class PixelUnshuffleStem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(12, 16, 3, 1, 1)
        self.down = nn.Conv2d(16, 16, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.conv(F.pixel_unshuffle(x, 2)))


class ReshapeStem(nn.Module):
    """Space-to-depth written with reshape and permute (block 4: 3 -> 48 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(48, 16, 3, 1, 1)
        self.down = nn.Conv2d(16, 16, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // 4, 4, w // 4, 4).permute(0, 3, 5, 1, 2, 4).reshape(b, c * 16, h // 4, w // 4)
        return self.down(self.conv(x))


def _space_to_depth_models():
    models = [PixelUnshuffleStem(), ReshapeStem()]
    try:
        from timm.layers import SpaceToDepth
    except ImportError:
        return models
    return models + [nn.Sequential(SpaceToDepth(4), nn.Conv2d(48, 16, 3, 1, 1), nn.Conv2d(16, 16, 3, 2, 1))]


@pytest.mark.parametrize("model", _space_to_depth_models(), ids=lambda m: type(m).__name__)
def test_in_chans_behind_a_space_to_depth_stem(model):
    from sparsify.encoder import _infer_in_chans
    from sparsify.trace import trace

    chans, shapes = _infer_in_chans(model, trace(model), (32, 32))
    assert chans == 3
    # wrap gets that far too: whatever it says about the stem, it is not about the input channels.
    try:
        sparsify.wrap(model, (32, 32))
    except sparsify.SparsifyError as e:
        assert "channels" not in str(e), str(e)


class _BlurPoolStem(nn.Module):
    """A reflect pad grows the map before a strided blur conv brings it back onto the grid (timm's
    blur pool): the refusal is about the reflect pad, not about an unaligned stem."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 1, 1)
        self.blur = nn.Conv2d(8, 8, 3, 2, 0, groups=8)
        self.down = nn.Conv2d(8, 8, 3, 2, 1)

    def forward(self, x):
        return self.down(self.blur(F.pad(self.conv(x), (1, 1, 1, 1), mode="reflect")))


def test_reflect_pad_before_a_strided_layer_is_not_called_an_unaligned_stem():
    with pytest.raises(SparsifyError) as info:
        sparsify.wrap(_BlurPoolStem(), (32, 32))
    assert "reflect" in str(info.value)
    assert "never line up" not in str(info.value)
