"""The k-NN monitor: the classifier itself, and the monitor on a labelled folder."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsify.recipes.cli import RecipeError
from sparsify.recipes.knn import KnnMonitor, knn_top1


def _clusters(n_per: int, classes: int, dim: int = 16, spread: float = 0.05, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    labels = torch.arange(classes).repeat_interleave(n_per)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def test_separated_clusters_are_classified_perfectly():
    feats, labels = _clusters(10, 3)
    assert knn_top1(feats, labels, k=5) == 1.0
    q, ql = _clusters(4, 3, seed=0)
    assert knn_top1(feats, labels, q + 0.01, ql, k=5) == 1.0


def test_leave_one_out_never_uses_the_image_itself():
    # every image has its own label: with itself excluded no neighbour can be right
    feats = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    assert knn_top1(feats, torch.arange(12), k=3) == 0.0
    # but as separate queries identical to the bank, each finds itself
    assert knn_top1(feats, torch.arange(12), feats.clone(), torch.arange(12), k=1) == 1.0


def test_random_labels_are_near_chance():
    g = torch.Generator().manual_seed(2)
    feats, labels = torch.randn(400, 32, generator=g), torch.randint(0, 4, (400,), generator=g)
    assert 0.1 < knn_top1(feats, labels, k=20) < 0.4


def test_monitor_on_a_labelled_folder(labelled_folder):
    mon = KnnMonitor(labelled_folder, (32, 32), 3, (0.5,) * 3, (0.25,) * 3, k=3, batch=5)
    assert mon.num_images == 16 and "leave-one-out" in mon.description
    enc = _ColourEncoder()
    enc.train()
    acc = mon.evaluate(enc, torch.device("cpu"))
    assert acc == 1.0  # the two classes differ by colour, which mean-pooled pixels show
    assert enc.training  # mode restored


def test_monitor_train_val_layout_and_errors(tmp_path):
    from _recipe_helpers import make_labelled_folder

    make_labelled_folder(tmp_path / "tv" / "train", per_class=4)
    make_labelled_folder(tmp_path / "tv" / "val", per_class=2)
    mon = KnnMonitor(tmp_path / "tv", (32, 32), 3, (0.5,) * 3, (0.25,) * 3, k=3)
    assert mon.num_images == 12 and "train/val" in mon.description
    assert mon.evaluate(_ColourEncoder(), torch.device("cpu")) == 1.0
    with pytest.raises(RecipeError, match="does not exist"):
        KnnMonitor(tmp_path / "missing", (32, 32), 3, (0.5,) * 3, (0.25,) * 3)


class _ColourEncoder(torch.nn.Module):
    """Stand-in encoder: one feature map, the image itself at stride 1."""

    def forward(self, x, mask=None):
        return [x]


# ---- the score is a function of the weights alone (issue 19)


def _wrapped_tiny(seed: int = 0, dropout: bool = False):
    """The tiny CNN, wrapped by sparsify as the pretraining recipe wraps it (BatchNorm in every stage)."""
    from tiny_models import tiny_cnn

    import sparsify

    torch.manual_seed(seed)
    model = tiny_cnn()
    if dropout:
        model.stages[1].append(torch.nn.Dropout(0.5))
    return sparsify.wrap(model, input_size=(32, 32))


def _running_statistics(enc):
    return [b.clone() for n, b in enc.named_buffers() if "running" in n]


@pytest.fixture(scope="module")
def tiny_encoder():
    return _wrapped_tiny()


@pytest.fixture(scope="module")
def monitor(tmp_path_factory):
    from _recipe_helpers import make_labelled_folder

    return KnnMonitor(make_labelled_folder(tmp_path_factory.mktemp("knn")), (32, 32), 3, (0.5,) * 3, (0.25,) * 3,
                      k=3, batch=5)  # fmt: skip


_scrambles = st.tuples(st.integers(0, 2**16), st.floats(-3.0, 3.0), st.floats(0.05, 20.0))


@settings(max_examples=6, deadline=None)
@given(scramble=_scrambles)
def test_score_ignores_the_running_statistics_and_keeps_them(monitor, tiny_encoder, scramble):
    """Whatever training did to BatchNorm's buffers, the same weights get the same features and score."""
    import copy

    from sparsify.recipes.knn import batchnorm_statistics_from, pooled_features

    mon = monitor
    enc = copy.deepcopy(tiny_encoder)  # each example starts from the freshly built encoder
    cpu = torch.device("cpu")
    with batchnorm_statistics_from(enc, mon.bank, mon.batch, cpu, None):
        before = pooled_features(enc, mon.bank, mon.batch, cpu, None)
    score = mon.evaluate(enc, cpu)
    plain = pooled_features(enc.eval(), mon.bank, mon.batch, cpu, None)

    seed, shift, scale = scramble  # what a training run does to the buffers, exaggerated
    g = torch.Generator().manual_seed(seed)
    for name, buf in enc.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(shift + torch.randn(buf.shape, generator=g))
        elif name.endswith("running_var"):
            buf.copy_(scale * torch.rand(buf.shape, generator=g) + 1e-3)
    scrambled = _running_statistics(enc)
    enc.train()
    with batchnorm_statistics_from(enc, mon.bank, mon.batch, cpu, None):
        after = pooled_features(enc, mon.bank, mon.batch, cpu, None)
    assert torch.equal(before, after)
    assert mon.evaluate(enc, cpu) == score
    assert all(torch.equal(a, b) for a, b in zip(_running_statistics(enc), scrambled))  # the run's own kept
    assert enc.training
    # the trap this guards against: plain eval mode reads the buffers, so its features did move
    assert not torch.allclose(plain, pooled_features(enc.eval(), mon.bank, mon.batch, cpu, None))


def test_statistics_follow_the_weights_and_draw_no_random_numbers(monitor):
    mon = monitor
    enc = _wrapped_tiny(dropout=True)
    cpu = torch.device("cpu")
    from sparsify.recipes.knn import batchnorm_statistics_from, pooled_features

    state = torch.get_rng_state()
    with batchnorm_statistics_from(enc, mon.bank, mon.batch, cpu, None):
        first = pooled_features(enc, mon.bank, mon.batch, cpu, None)
        # the estimate is the statistics of each layer's input over the reference images
        bn = enc.source_model.stages[0][1]
        x = torch.cat([mon.bank[i : i + 5] for i in range(0, len(mon.bank), 5)])
        conv_out = enc.source_model.stages[0][0](x)
        torch.testing.assert_close(bn.running_mean, conv_out.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, conv_out.var((0, 2, 3)), rtol=1e-4, atol=1e-6)
    assert torch.equal(torch.get_rng_state(), state)  # eval mode throughout: dropout drew nothing
    with torch.no_grad():  # other weights: other statistics, other features (not forced to agree)
        for p in enc.parameters():
            p.add_(0.3 * torch.randn_like(p))
    with batchnorm_statistics_from(enc, mon.bank, mon.batch, cpu, None):
        assert not torch.allclose(first, pooled_features(enc, mon.bank, mon.batch, cpu, None))
