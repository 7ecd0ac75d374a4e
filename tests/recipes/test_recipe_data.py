"""Data: folder search, corrupt files, reproducible augmentation, the global-batch sampler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _recipe_helpers import make_image_folder
from sparsify.recipes.cli import RecipeError, parse_size
from sparsify.recipes.data import (
    GlobalBatchSampler,
    ImageFiles,
    RandomResizedCropFlip,
    SampleImages,
    SkipCounter,
    collate_images,
    find_images,
    find_labelled_images,
    load_image,
)


def test_find_images_recursive_sorted_and_skips_non_images(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", n=6, corrupt=1)
    (root / "notes.txt").write_text("hello")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.png").write_bytes(b"")
    found = find_images(root)
    assert len(found) == 7  # 6 images + 1 corrupt file with an image suffix
    assert found == sorted(found)
    assert any("deep" in str(p) for p in found)  # nested folders are searched


def test_find_images_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        find_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="no images found"):
        find_images(tmp_path / "empty")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(RecipeError, match="is a file"):
        find_images(tmp_path / "file.png")


def test_labelled_folder(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", n=6, corrupt=0)
    paths, labels, classes = find_labelled_images(root)
    assert classes == ["class0", "class1"]
    assert sorted(set(labels)) == [0, 1] and len(paths) == 6


def test_corrupt_file_is_replaced_and_reported(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", n=4, corrupt=1)
    paths = find_images(root)
    ds = ImageFiles(paths, RandomResizedCropFlip((16, 16)), channels=3)
    bad_index = next(i for i, p in enumerate(paths) if "broken" in p.name)
    img, _, bad = ds[bad_index]
    assert img.shape == (3, 16, 16) and bad == (str(paths[bad_index]),)
    counter = SkipCounter()
    counter.update(bad, report=False)
    counter.update(bad, report=False)
    assert counter.count == 1


def test_all_corrupt_is_a_clear_error(tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.png").write_bytes(b"nope")
    ds = ImageFiles(find_images(d), RandomResizedCropFlip((16, 16)))
    with pytest.raises(RecipeError, match="could not read any"):
        ds.probe()


def test_augmentation_is_a_function_of_seed_epoch_index(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", n=4, corrupt=0)
    tf = RandomResizedCropFlip((24, 32), scale=(0.2, 1.0))
    a = ImageFiles(find_images(root), tf, seed=3)
    b = ImageFiles(find_images(root), tf, seed=3)
    assert torch.equal(a[1][0], b[1][0])
    a.set_epoch(1)
    assert not torch.equal(a[1][0], b[1][0])
    assert a[1][0].shape == (3, 24, 32)  # non-square output


def test_channels_and_npy(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", n=2, corrupt=0)
    p = find_images(root)[0]
    assert load_image(p, 1).shape[0] == 1
    assert load_image(p, 4).shape[0] == 4
    arr = torch.rand(20, 30, 5).numpy()
    import numpy as np

    np.save(tmp_path / "x.npy", arr)
    t = load_image(tmp_path / "x.npy", 5)
    assert t.shape == (5, 20, 30)


def test_sample_images_are_real_photographs_offline() -> None:
    ds = SampleImages(RandomResizedCropFlip((32, 32)), channels=3, length=10)
    assert len(ds.images) >= 8
    x, label, bad = ds[3]
    assert x.shape == (3, 32, 32) and label == -1 and bad == ()
    grey = SampleImages(RandomResizedCropFlip((32, 32), mean=(0.5,), std=(0.25,)), channels=1, length=4)
    assert grey[0][0].shape == (1, 32, 32)


def _global_batches(sampler_list: list[GlobalBatchSampler]) -> list[list[int]]:
    streams = [list(s) for s in sampler_list]
    return [sum((s[i] for s in streams), []) for i in range(len(streams[0]))]


def test_sampler_world_size_invariant() -> None:
    one = GlobalBatchSampler(50, 8, world_size=1, rank=0, seed=5)
    two = [GlobalBatchSampler(50, 8, world_size=2, rank=r, seed=5) for r in range(2)]
    for s in [one, *two]:
        s.set_epoch(2)
    assert _global_batches([one]) == _global_batches(two)
    assert len(one) == 50 // 8
    assert all(len(b) == 4 for b in list(two[0]))


def test_sampler_resume_and_accum() -> None:
    s = GlobalBatchSampler(40, 8, accum=2, seed=1)
    s.set_epoch(0)
    full = list(s)
    assert len(full) == 10 and all(len(b) == 4 for b in full)
    s.set_epoch(0, start_step=3)
    assert list(s) == full[6:]
    with pytest.raises(RecipeError, match="divisible"):
        GlobalBatchSampler(40, 6, world_size=4)
    with pytest.raises(RecipeError, match="larger than the dataset"):
        GlobalBatchSampler(5, 8)


def test_collate_flattens_skips() -> None:
    batch = [(torch.zeros(3, 4, 4), -1, ("a",)), (torch.zeros(3, 4, 4), -1, ())]
    x, y, bad = collate_images(batch)
    assert x.shape == (2, 3, 4, 4) and y.tolist() == [-1, -1] and bad == ["a"]


def test_parse_size() -> None:
    assert parse_size("224") == (224, 224)
    assert parse_size("192x256") == (192, 256)
    assert parse_size(96) == (96, 96)
    for bad in ("0", "a", "1x2x3", "-4"):
        with pytest.raises(RecipeError):
            parse_size(bad)
