"""Data: folder search, corrupt files, reproducible augmentation, the global-batch sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def test_symlink_loops_visit_each_real_folder_once(tmp_path: Path) -> None:
    # Before: one loop counted every image ~40 times (until ELOOP), two loops walked for hours.
    root = make_image_folder(tmp_path / "d", n=6, corrupt=0)
    (root / "class0" / "up").symlink_to(root, target_is_directory=True)  # loop 1: back to the top
    (root / "class1" / "sideways").symlink_to(root / "class0", target_is_directory=True)  # loop 2 + a twin
    (root / "class1" / "dangling").symlink_to(tmp_path / "nowhere", target_is_directory=True)
    found = find_images(root)
    assert len(found) == 6
    assert len({p.resolve() for p in found}) == 6


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (grey or RGB) written by hand: PIL cannot write 16-bit RGB."""
    import struct
    import zlib

    h, w = arr.shape[:2]
    raw = b"".join(b"\0" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2 if arr.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("kind", ["grey.png", "grey.tif", "rgb.png"])
@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_images_keep_their_range(kind: str, channels: int, tmp_path: Path) -> None:
    # Before: a 16-bit grey image was clipped at 255 of 65535, i.e. saturated to white.
    from PIL import Image

    rng = np.random.default_rng(0)
    shape = (20, 30, 3) if kind.startswith("rgb") else (20, 30)
    arr = (rng.random(shape) * 40000 + 5000).astype(np.uint16)
    path = tmp_path / f"img16-{kind}"
    if kind == "rgb.png":
        path.write_bytes(_png16(arr))
    else:
        Image.fromarray(arr).save(path)
    img = load_image(path, channels)
    assert img.shape == (channels, 20, 30)
    want = torch.from_numpy(arr.astype("float32") / 65535.0)
    want = want.permute(2, 0, 1) if want.ndim == 3 else want[None]
    if channels == 1 and want.shape[0] == 3:
        want = (want * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    elif channels == 3 and want.shape[0] == 1:
        want = want.expand(3, -1, -1)
    assert torch.allclose(img, want, atol=2.5 / 255)  # PIL reduces 16-bit RGB to 8 bits per channel
    assert 0.05 < float(img.mean()) < 0.75
