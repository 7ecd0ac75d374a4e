"""Nothing frozen at trace time: mode flags passed as arguments and module tensors stay live.

Ground truth is the unmodified model's own outputs, captured with forward hooks
(``sparsify.testing.capture_module_outputs``), in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsify
from sparsify.testing import capture_module_outputs


def _model_out(model: nn.Module, x: torch.Tensor, name: str, train: bool, seed: int = 0) -> torch.Tensor:
    return capture_module_outputs(model, x, [name], train=train, seed=seed)[name]


def _enc_out(enc: nn.Module, x: torch.Tensor, train: bool, mask=None, seed: int = 0) -> torch.Tensor:
    enc.train(train)
    torch.manual_seed(seed)
    with torch.no_grad():
        return enc(x, mask)[-1]


def scale_in_training(x: torch.Tensor, training: bool = False) -> torch.Tensor:
    # A user function taking the flag, kept as one call (autowrap_functions): doubles in train mode.
    return x * 2.0 if training else x


def _drop(x: torch.Tensor, training: bool) -> torch.Tensor:
    # A user helper traced through: the flag reaches F.alpha_dropout as an argument.
    return F.alpha_dropout(x, 0.1, training=training)


sparsify.register_adapter(scale_in_training, kind="pointwise", preserves_zero=True)
WRAP = {"autowrap_functions": [scale_in_training]}


class FunctionalNet(nn.Module):
    """self.training passed to F.batch_norm (positionally), F.dropout / F.alpha_dropout (as keywords) and a
    user function, in the root's forward and in a submodule's."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.bn = nn.BatchNorm2d(8)
        self.block = Inner(8)
        self.head = nn.Conv2d(8, 8, 3, 2, 1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.batch_norm(x, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias,
                         self.training, 0.1, 1e-5)
        x = F.dropout(F.relu(x), 0.25, training=self.training)
        return self.head(self.block(x))


class Inner(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = scale_in_training(self.conv(x), training=self.training)
        return x + _drop(y, self.training)


class Flagged(nn.Module):
    """A module without parameters whose forward passes its flag on (not traced into the fx copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, 0.5, self.training)


@pytest.fixture(autouse=True)
def _fp64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_mode_flags_follow_the_mode_at_run_time():
    torch.manual_seed(0)
    model = FunctionalNet()
    enc = sparsify.wrap(model, (32, 32), **WRAP)
    x = torch.randn(2, 3, 32, 48)
    for train in (True, False, True):
        want = _model_out(model, x, "head", train)
        got = _enc_out(enc, x, train)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # Train and eval really differ here (batch statistics, dropout, the doubling).
    assert not torch.allclose(_model_out(model, x, "head", True), _model_out(model, x, "head", False))


def test_each_module_reads_its_own_flag():
    torch.manual_seed(0)
    model = FunctionalNet()
    enc = sparsify.wrap(model, (32, 32), **WRAP)
    x = torch.randn(2, 3, 32, 32)
    enc.train()
    model.block.eval()  # only the inner block in eval mode: its doubling and alpha dropout are off
    torch.manual_seed(0)
    with torch.no_grad():
        got = enc(x)[-1]
    flags = [(m, m.training) for m in model.modules()]
    model.train()
    model.block.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        want = capture_module_outputs(model, x, ["head"], train=None)["head"]
    for m, f in flags:
        m.training = f
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_flag_of_a_module_fx_did_not_copy():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), Flagged(), nn.Conv2d(8, 8, 3, 2, 1))
    enc = sparsify.wrap(model, (32, 32))
    x = torch.randn(2, 3, 32, 32)
    assert "training" in enc.code
    enc.train()
    out_train = enc(x)[-1]
    torch.testing.assert_close(enc.eval()(x)[-1], _model_out(model, x, "2", False))
    assert not torch.allclose(out_train, enc(x)[-1])  # dropout was live in train mode
    model[1].eval()  # the flag read is the user's module itself
    enc.train()
    model[1].eval()
    torch.testing.assert_close(enc(x)[-1], _model_out(model, x, "2", False))


def test_masked_batch_norm_gets_the_live_flag():
    torch.manual_seed(0)
    model = FunctionalNet()
    enc = sparsify.wrap(model, (32, 32), **WRAP)
    x = torch.randn(2, 3, 32, 32)
    mask = sparsify.random_mask(2, (8, 8), 0.5, generator=torch.Generator().manual_seed(0))
    before = model.bn.running_mean.clone()
    enc.eval()(x, mask)
    assert torch.equal(model.bn.running_mean, before)  # eval: running statistics are used, not updated
    enc.train()(x, mask)
    assert not torch.equal(model.bn.running_mean, before)  # train: updated from the active sites


def test_live_flags_under_compile_fullgraph():
    torch.manual_seed(0)
    model = FunctionalNet()
    enc = sparsify.wrap(model, (32, 32), **WRAP)
    compiled = torch.compile(enc, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    for train in (False, True):
        got = _enc_out(compiled, x, train)
        torch.testing.assert_close(got, _model_out(model, x, "head", train), rtol=1e-10, atol=1e-10)


class MomentumByMode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        momentum = 0.1 if self.training else 0.0
        return F.batch_norm(self.conv(x), self.bn.running_mean, self.bn.running_var, None, None, True, momentum)


class NotTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.conv(x), 0.5, not self.training)


@pytest.mark.parametrize(
    "model, words",
    [
        (MomentumByMode(), ["'batch_norm'", "'momentum'", "0.1 in train mode and 0.0 in eval mode", "<top level>"]),
        (nn.Sequential(NotTraining()), ["module '0'", "'training'", "False in train mode and True in eval mode"]),
    ],
)
def test_other_mode_dependent_arguments_are_refused(model, words):
    with pytest.raises(sparsify.SparsifyError, match="depend on the train/eval mode") as info:
        sparsify.wrap(model, (32, 32))
    for word in words:
        assert word in str(info.value)


class FrozenBN(nn.Module):
    """detectron2-style frozen BatchNorm: arithmetic on its own buffers inside forward."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.rand(c) + 0.5)
        self.register_buffer("bias", torch.randn(c))
        self.register_buffer("running_mean", torch.randn(c))
        self.register_buffer("running_var", torch.rand(c) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class ScaledBuffer(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.register_buffer("gain", torch.rand(1, c, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.gain * 2.0)


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.fbn = FrozenBN(8)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), ScaledBuffer(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(F.relu(self.fbn(self.stem(x)))).mean((2, 3)))


def test_module_tensors_stay_live_and_named():
    torch.manual_seed(0)
    model = Backbone()
    enc = sparsify.wrap(model, (32, 32))
    sd = enc.state_dict()
    assert not [k for k in sd if "constant" in k], list(sd)
    model_sd = model.state_dict(keep_vars=True)
    for k, v in enc.state_dict(keep_vars=True).items():
        assert model_sd[k] is v, k  # the user's own objects under their own names
    fresh = Backbone()
    missing, unexpected = fresh.load_state_dict(enc.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["fc.bias", "fc.weight"]

    # New weights loaded into the model are what the encoder computes with.
    x = torch.randn(2, 3, 32, 32)
    model.load_state_dict(Backbone().state_dict())
    torch.testing.assert_close(_enc_out(enc, x, False), _model_out(model, x, "body", False))


def test_moving_the_encoder_moves_the_models_buffers():
    model = Backbone().float()
    enc = sparsify.wrap(model, (32, 32))
    enc.to(torch.float64)
    assert model.fbn.running_var.dtype == torch.float64
    assert enc.fbn.running_var is model.fbn.running_var
    assert enc.body[1].gain is model.body[1].gain


class MadeInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, 2, 1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x) * torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)  # a true constant of the code
        return self.fc(y.mean((2, 3)))


def test_constants_made_in_forward_stay_out_of_the_state_dict():
    model = MadeInForward()
    enc = sparsify.wrap(model, (32, 32))
    assert "_tensor_constant0" in dict(enc.named_buffers())
    missing, unexpected = MadeInForward().load_state_dict(enc.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["fc.bias", "fc.weight"]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_enc_out(enc, x, False), _model_out(model, x, "conv", False) * torch.tensor(
        [1.0, 2.0]).view(1, 2, 1, 1))


class BranchesOnBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2, 1)
        self.register_buffer("gain", torch.full((1, 4, 1, 1), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gain.sum() > 0:  # Python control flow on a buffer's value
            return self.conv(x) * (self.gain + 1.0)
        return self.conv(x)


def test_branching_on_a_buffer_still_wraps_with_a_warning():
    model = BranchesOnBuffer()
    with pytest.warns(UserWarning, match="branches on a buffer's value"):
        enc = sparsify.wrap(model, (32, 32))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_enc_out(enc, x, False), _model_out(model, x, "", False))


def test_live_flags_survive_pickling():
    import pickle

    torch.manual_seed(0)
    model = FunctionalNet()
    enc = pickle.loads(pickle.dumps(sparsify.wrap(model, (32, 32), **WRAP)))
    twin = enc.source_model  # the pickled copy of the model, sharing the copy's modules
    x = torch.randn(2, 3, 32, 32)
    for train in (True, False):
        torch.testing.assert_close(_enc_out(enc, x, train), _model_out(twin, x, "head", train), rtol=1e-10, atol=1e-10)


def test_encoder_train_honours_the_models_own_train_override():
    """A model whose train() keeps its stem frozen (eval-mode BatchNorm) is switched the same way by
    enc.train(); the model's root and removed head keep their own flags."""
    from tests.zoo.models import FrozenStemNet

    model = FrozenStemNet().eval()
    enc = sparsify.wrap(model, (32, 32), stages=["layer1", "layer2"])
    enc.train()
    assert enc.training
    assert not model.stem[1].training and model.layer1.bn1.training
    assert not model.training  # only the modules the encoder uses change mode
    enc.eval()
    assert not model.layer1.bn1.training
