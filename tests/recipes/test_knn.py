"""The k-NN monitor: the classifier itself, and the monitor on a labelled folder."""

from __future__ import annotations

import pytest
import torch
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
