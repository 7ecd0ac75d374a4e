"""sparsify.wrap: the public API, sharing with the user's model, refusals and compilation."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import sparsify


def _resnet18():
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False)


@pytest.fixture(scope="module")
def resnet():
    model = _resnet18()
    return model, sparsify.wrap(model, input_size=(64, 96))


def test_api_attributes(resnet):
    _, enc = resnet
    assert enc.feature_strides == [4, 8, 16, 32]
    assert enc.feature_channels == [64, 128, 256, 512]
    assert enc.downsample_ratio == 32
    assert enc.in_chans == 3
    assert enc.norm_type == "batch"
    assert [(s.stride, s.channels) for s in enc.stages] == list(zip(enc.feature_strides, enc.feature_channels))
    assert all(isinstance(s.name, str) for s in enc.stages)


@pytest.mark.parametrize("size", [(64, 96), (96, 64), (128, 32)])
def test_any_multiple_of_R_works_at_run_time(resnet, size):
    _, enc = resnet
    h, w = size
    mask = sparsify.random_mask(2, (h // 32, w // 32), 0.5)
    feats = enc(torch.randn(2, 3, h, w), mask)
    assert [tuple(f.shape[-2:]) for f in feats] == [(h // s, w // s) for s in enc.feature_strides]


def test_model_untouched_and_parameters_shared():
    model = _resnet18()
    before = copy.deepcopy(model.state_dict())
    modules_before = dict(model.named_modules())
    flags = {n: m.training for n, m in model.named_modules()}
    enc = sparsify.wrap(model, (64, 64))
    assert dict(model.named_modules()) == modules_before
    assert {n: m.training for n, m in model.named_modules()} == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    own = dict(model.named_parameters())
    for name, p in enc.named_parameters():
        assert p is own[name], name
    own_buffers = dict(model.named_buffers())
    for name, b in enc.named_buffers():
        assert b is own_buffers[name], name
    # the encoder's names are the model's minus the cut-away head
    assert set(enc.state_dict()) == {k for k in model.state_dict() if not k.startswith("fc.")}


def test_training_the_encoder_trains_the_users_model():
    model = _resnet18()
    enc = sparsify.wrap(model, (64, 64))
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    w0 = model.conv1.weight.detach().clone()
    mean0 = model.bn1.running_mean.clone()
    enc.train()
    feats = enc(torch.randn(2, 3, 64, 64), sparsify.random_mask(2, (2, 2), 0.5))
    sum(f.square().mean() for f in feats).backward()
    opt.step()
    assert not torch.equal(model.conv1.weight, w0)
    assert not torch.equal(model.bn1.running_mean, mean0)
    fresh = timm.create_model("resnet18", pretrained=False)
    missing, unexpected = fresh.load_state_dict(enc.state_dict(), strict=False)
    assert unexpected == [] and set(missing) == {"fc.weight", "fc.bias"}


def test_dense_encoder_matches_model_features(resnet):
    model, enc = resnet
    model.eval()
    enc.eval()
    x = torch.randn(2, 3, 64, 96)
    dense = enc.dense_encoder()
    last = dense(x)[-1]
    torch.testing.assert_close(last, model.forward_features(x))
    torch.testing.assert_close(enc(x, None)[-1], last)


def test_input_errors(resnet):
    _, enc = resnet
    with pytest.raises(sparsify.SparsifyError, match="multiple of the downsample ratio 32"):
        enc(torch.randn(1, 3, 70, 64))
    with pytest.raises(sparsify.SparsifyError, match="input channels"):
        enc(torch.randn(1, 1, 64, 64))
    with pytest.raises(sparsify.SparsifyError, match="bool"):
        enc(torch.randn(1, 3, 64, 64), torch.ones(1, 1, 2, 2))
    with pytest.raises(sparsify.SparsifyError, match="shape"):
        enc(torch.randn(1, 3, 64, 64), torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(sparsify.SparsifyError, match="image batch"):
        enc(torch.randn(3, 64, 64))


def test_wrap_errors():
    model = _resnet18()
    with pytest.raises(sparsify.SparsifyError, match="multiple"):
        sparsify.wrap(model, (80, 64))
    with pytest.raises(sparsify.SparsifyError, match="not a node"):
        sparsify.wrap(model, (64, 64), stages=["layer1", "nope"])
    with pytest.raises(sparsify.SparsifyError, match="strictly increasing"):
        sparsify.wrap(model, (64, 64), stages=["layer2_1_act2", "layer1_1_act2"])
    with pytest.raises(sparsify.SparsifyError, match="nn.Module"):
        sparsify.wrap(lambda x: x)


def test_explicit_stages_and_node_names():
    model = _resnet18()
    names = {row.name: row.stride for row in sparsify.graph_node_names(model, (64, 64))}
    assert names["layer3_1_act2"] == 16
    enc = sparsify.wrap(model, (64, 64), stages=["layer2_1_act2", "layer3_1_act2"])
    assert enc.feature_strides == [8, 16] and enc.downsample_ratio == 16
    feats = enc(torch.randn(1, 3, 48, 80), sparsify.random_mask(1, (3, 5)))
    assert [f.shape[1] for f in feats] == [128, 256]


class _BranchesOnValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.gate = _ValueGate()

    def forward(self, x):
        return self.gate(self.conv(x))


class _ValueGate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return x
        return -x


def test_untraceable_model_names_the_module_and_the_fix():
    with pytest.raises(sparsify.SparsifyError) as info:
        sparsify.wrap(_BranchesOnValues(), (32, 32))
    message = str(info.value)
    assert "'gate'" in message and "_ValueGate" in message and "leaf_modules" in message


class _ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        if self.training:
            x = x * 2
        return x


def test_graph_that_freezes_train_or_eval_mode_is_refused():
    with pytest.raises(sparsify.SparsifyError, match="differs between train and eval"):
        sparsify.wrap(_ModeDependent(), (32, 32))


class _TinyNet(nn.Module):
    """BN, GN, SE (global mean + sigmoid gate), max pool, residual: a bit of everything."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv = nn.Conv2d(8, 16, 3, 2, 1)
        self.gn = nn.GroupNorm(4, 16)
        self.fc = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.stem(x))))
        y = self.gn(self.conv(x))
        gate = torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))
        return F.gelu(y * gate + y)


def test_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(0)
    enc = sparsify.wrap(_TinyNet(), (32, 32))
    enc.eval()
    x = torch.randn(2, 3, 32, 48)
    mask = sparsify.random_mask(2, (4, 6), 0.5)
    expected = enc(x, mask)
    compiled = torch.compile(enc, fullgraph=True)
    for got, want in zip(compiled(x, mask), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
