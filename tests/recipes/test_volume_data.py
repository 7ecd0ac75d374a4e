"""Volume data: readers (real NIfTI samples, .npy/.npz, DICOM), layout rules, intensity, crops, cache."""

from __future__ import annotations

import gzip
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nibabel.testing import data_path
from sparsify.recipes import _volume_io
from sparsify.recipes.cli import RecipeError
from sparsify.recipes.volumes import (
    VOLUME_SUFFIXES,
    DamagedVolume,
    IntensityRule,
    SyntheticVolumes,
    VolumeCase,
    VolumeDataset,
    _channels_of,
    find_volumes,
    looks_like_volumes,
    parse_intensity,
    read_volume,
)
from torch.utils.data import DataLoader

NIB = Path(data_path)


def _nifti(path: Path, arr: np.ndarray, zooms: tuple[float, ...] = (1.0, 2.0, 3.0)) -> Path:
    img = nib.Nifti1Image(arr, np.diag([*zooms[:3], 1.0]))
    img.header.set_zooms(zooms)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def _ramp(shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    return np.arange(int(np.prod(shape))).reshape(shape).astype(dtype)


# ------------------------------------------------------------------------------------------- readers


def test_real_nibabel_samples_read_with_axes_and_spacing(tmp_path: Path) -> None:
    shutil.copy(NIB / "anatomical.nii", tmp_path)
    shutil.copy(NIB / "example4d.nii.gz", tmp_path)
    cases = find_volumes(tmp_path)
    # example4d has 2 time points along its 4th axis: without channels each is a sample
    assert [(c.paths[0].name, c.frame) for c in cases] == [
        ("anatomical.nii", None),
        ("example4d.nii.gz", 0),
        ("example4d.nii.gz", 1),
    ]
    ref = np.asarray(nib.load(str(NIB / "anatomical.nii")).get_fdata(), dtype=np.float32)  # (x, y, z)
    vol, spacing = read_volume(cases[0])
    assert vol.shape == (1, 25, 41, 33) and vol.dtype == np.float32
    np.testing.assert_array_equal(vol[0], ref.transpose(2, 1, 0))
    assert spacing == (2.0, 2.0, 2.0)
    # uncompressed and unscaled: read in place, never copied into the cache
    assert isinstance(_channels_of(cases[0], None)[0][0], np.memmap)
    cached = VolumeDataset(cases, 8, cache_dir=tmp_path / "cache", train=False)
    assert torch.equal(cached[0], VolumeDataset(cases, 8, train=False)[0])
    assert not list((tmp_path / "cache").glob("*.npy"))
    torch.testing.assert_close(cached[2], VolumeDataset(cases, 8, train=False)[2])  # a time point, via the cache
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    assert len(find_volumes(tmp_path)) == 3  # the cache inside the data folder is not searched
    ref4 = np.asarray(nib.load(str(NIB / "example4d.nii.gz")).get_fdata(), dtype=np.float32)  # (x, y, z, t)
    vol1, spacing1 = read_volume(cases[2])
    np.testing.assert_array_equal(vol1[0], ref4[..., 1].transpose(2, 1, 0))
    assert spacing1 is not None and spacing1 == pytest.approx((2.2, 2.0, 2.0), abs=1e-5)
    # the same 4-D file as 2 channels when the model takes 2
    with pytest.raises(RecipeError, match="anatomical.nii.*single-channel"):
        find_volumes(tmp_path, channels=2)  # the 3-D file cannot give 2 channels
    (tmp_path / "anatomical.nii").unlink()
    (both,) = find_volumes(tmp_path, channels=2)
    assert both.frame is None
    np.testing.assert_array_equal(read_volume(both)[0], ref4.transpose(3, 2, 1, 0))


def test_generated_nifti_axes_spacing_and_scaling(tmp_path: Path) -> None:
    arr = _ramp((4, 5, 6), np.int16)  # (x, y, z)
    path = _nifti(tmp_path / "a.nii", arr, (1.0, 2.0, 3.0))
    raw = bytearray(path.read_bytes())
    raw[112:120] = np.array([2.0, -5.0], "<f4").tobytes()  # scl_slope, scl_inter in the NIfTI-1 header
    path.write_bytes(bytes(raw))
    assert nib.load(str(path)).dataobj.slope == 2.0
    vol, spacing = read_volume(VolumeCase((path,)))
    assert vol.shape == (1, 6, 5, 4)
    np.testing.assert_array_equal(vol[0], (arr.astype(np.float32) * 2 - 5).transpose(2, 1, 0))
    assert spacing == (3.0, 2.0, 1.0)


def test_npy_and_npz_layouts(tmp_path: Path) -> None:
    a = _ramp((3, 4, 5))
    np.save(tmp_path / "a.npy", a)
    vol, spacing = read_volume(VolumeCase((tmp_path / "a.npy",)))
    np.testing.assert_array_equal(vol[0], a)
    assert spacing is None
    # .npz: 'image' wins over other keys; 'spacing' is read
    np.savez(tmp_path / "b.npz", other=np.zeros((2, 2, 2)), image=a + 1, spacing=np.array([2.5, 1.0, 0.5]))
    vol, spacing = read_volume(VolumeCase((tmp_path / "b.npz",)))
    np.testing.assert_array_equal(vol[0], a + 1)
    assert spacing == (2.5, 1.0, 0.5)
    # no known key: the first array
    np.savez(tmp_path / "c.npz", first=a + 2, second=np.zeros((2, 2, 2)))
    np.testing.assert_array_equal(read_volume(VolumeCase((tmp_path / "c.npz",)))[0][0], a + 2)
    # a .npy source is memory-mapped, not loaded whole
    chans, _ = _channels_of(VolumeCase((tmp_path / "a.npy",)), None)
    assert isinstance(chans[0], np.memmap)


def _dicom_series(folder: Path, planes: np.ndarray, order: list[int]) -> None:
    """Write ``planes`` (D, H, W) as a CT series, files named in ``order`` (so name order != slice order)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series = generate_uid()
    for k, z in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.Modality = "CT"
        ds.InstanceNumber = z + 1
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * z]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.7, 0.8]
        ds.SliceThickness = 2.5
        ds.RescaleSlope = 1
        ds.RescaleIntercept = -1024
        ds.Rows, ds.Columns = planes.shape[1:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = planes[z].astype(np.uint16).tobytes()
        name = f"IM{k:04d}" if k % 2 else f"slice{k}.dcm"  # with and without the suffix (DICM marker)
        ds.save_as(str(folder / name), enforce_file_format=True)


def test_dicom_series_sorted_by_position_with_rescale_and_spacing(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    planes = _ramp((4, 6, 5)) + 1000
    _dicom_series(tmp_path / "patient" / "series", planes, order=[2, 0, 3, 1])
    assert looks_like_volumes(tmp_path)
    (case,) = find_volumes(tmp_path)
    assert case.paths == (tmp_path / "patient" / "series",)
    vol, spacing = read_volume(case)
    np.testing.assert_array_equal(vol[0], planes - 1024)
    assert spacing == pytest.approx((2.5, 0.7, 0.8))
    ds = VolumeDataset([case], 4, intensity="ct:-100,100", train=False)
    assert ds[0].shape == (1, 4, 4, 4)
    assert ds.survey()["spacings"] == {(2.5, 0.7, 0.8)}


def test_dicom_without_pydicom_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "x.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    with pytest.raises(RecipeError, match=r"pip install 'sparsify-cnn\[scans\]'") as info:
        find_volumes(tmp_path)
    assert str(folder) in str(info.value)


# ------------------------------------------------------------------------------------------- layouts


def test_none_found_lists_suffixes_and_detection(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(RecipeError) as info:
        find_volumes(tmp_path)
    assert all(s in str(info.value) for s in VOLUME_SUFFIXES)
    with pytest.raises(RecipeError, match="does not exist"):
        find_volumes(tmp_path / "missing")
    assert not looks_like_volumes(tmp_path)
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    assert not looks_like_volumes(tmp_path)
    np.save(tmp_path / "v.npy", np.zeros((4, 4, 4)))
    assert not looks_like_volumes(tmp_path)  # fewer volumes than images
    np.save(tmp_path / "w.npy", np.zeros((4, 4, 4)))
    assert looks_like_volumes(tmp_path)


def test_four_d_rules(tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", _ramp((3, 4, 5, 6)))
    assert [c.frame for c in find_volumes(tmp_path)] == [0, 1, 2]
    assert [c.frame for c in find_volumes(tmp_path, channels=1)] == [0, 1, 2]
    (case,) = find_volumes(tmp_path, channels=3)
    assert case.frame is None and read_volume(case)[0].shape == (3, 4, 5, 6)
    with pytest.raises(RecipeError, match=r"t\.npy.*4th axis.*3 input channels.*or with 1"):
        find_volumes(tmp_path, channels=2)
    other = tmp_path / "three_d"
    other.mkdir()
    np.save(other / "v.npy", _ramp((4, 5, 6)))
    with pytest.raises(RecipeError, match=r"v\.npy.*single-channel.*2 input channels"):
        find_volumes(other, channels=2)
    # a 2-D array is no volume: named when it is the only file
    flat = tmp_path / "flat"
    flat.mkdir()
    np.save(flat / "f.npy", np.zeros((4, 4)))
    with pytest.raises(RecipeError, match=r"could be read.*f\.npy': holds a 2-D array"):
        find_volumes(flat)


def test_multimodal_case_folders_and_class_labels(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    for case in ("c01", "c02"):
        for k, mod in enumerate(("t2", "flair", "t1")):  # channel order = sorted names: flair, t1, t2
            _nifti(tmp_path / case / f"{case}_{mod}.nii.gz", np.full((4, 5, 6), 10 * k, np.int16))
    cases = find_volumes(tmp_path, channels=3)
    assert [c.paths[0].parent.name for c in cases] == ["c01", "c02"]
    assert [p.name for p in cases[0].paths] == ["c01_flair.nii.gz", "c01_t1.nii.gz", "c01_t2.nii.gz"]
    assert all(c.label is None for c in cases)
    vol, _ = read_volume(cases[1])
    assert vol.shape == (3, 6, 5, 4) and [float(vol[c].max()) for c in range(3)] == [10.0, 20.0, 0.0]
    # the model says 1 channel (or nothing): every file is its own case; 2 channels fit nothing
    assert len(find_volumes(tmp_path, channels=1)) == len(find_volumes(tmp_path)) == 6
    with pytest.raises(RecipeError, match="single-channel 3-D volume.*2 input channels.*folder of 2 files"):
        find_volumes(tmp_path, channels=2)
    # class folders give labels (files directly below each class)
    labelled = tmp_path / "labelled"
    for cls in ("healthy", "tumour"):
        (labelled / cls).mkdir(parents=True)
        for i in range(2):
            np.save(labelled / cls / f"{cls}{i}.npy", np.zeros((4, 4, 4)))
    found = find_volumes(labelled)
    assert [c.label for c in found] == ["healthy", "healthy", "tumour", "tumour"]
    ds = VolumeDataset(found, 4)
    assert ds.classes == ["healthy", "tumour"] and ds.sample(3)[1] == 1
    # case folders inside class folders: labelled by the class folder
    nested = tmp_path_factory.mktemp("nested")
    for cls, case in (("glioma", "p1"), ("glioma", "p2"), ("normal", "p3")):
        for mod in ("t1", "t2"):
            _nifti(nested / cls / case / f"{case}_{mod}.nii.gz", np.zeros((4, 5, 6), np.int16))
    assert [(c.label, c.paths[1].name) for c in find_volumes(nested, channels=2)] == [
        ("glioma", "p1_t2.nii.gz"),
        ("glioma", "p2_t2.nii.gz"),
        ("normal", "p3_t2.nii.gz"),
    ]
    # a case folder missing a modality is named
    _nifti(tmp_path / "c03" / "c03_t1.nii.gz", np.zeros((4, 5, 6), np.int16))
    _nifti(tmp_path / "c03" / "c03_t2.nii.gz", np.zeros((4, 5, 6), np.int16))
    with pytest.raises(RecipeError, match=r"case folder '.*c03' holds \['_t1.nii.gz', '_t2.nii.gz'\] where"):
        find_volumes(tmp_path, channels=3)
    shutil.rmtree(tmp_path / "c03")
    # channel shapes that differ inside a case: named and skipped as damaged
    shutil.rmtree(labelled)
    _nifti(tmp_path / "c02" / "c02_t1.nii.gz", np.zeros((4, 5, 7), np.int16))
    ds = VolumeDataset(find_volumes(tmp_path, channels=3), 4)
    _, _, bad = ds.sample(1)
    assert bad == (str(tmp_path / "c02" / "c02_flair.nii.gz"),)
    assert "differ in shape" in ds.damaged[bad[0]]


# ------------------------------------------------------------------------------------------- damage


def test_damaged_files_are_skipped_and_named(tmp_path: Path) -> None:
    good = _nifti(tmp_path / "good.nii.gz", _ramp((8, 8, 8), np.int16))
    raw = gzip.decompress(good.read_bytes())
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(raw)[:200])  # truncated
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file at all")
    cases = find_volumes(tmp_path)
    assert [c.paths[0].name for c in cases] == ["cut.nii.gz", "good.nii.gz", "junk.npy"]
    ds = VolumeDataset(cases, 4, seed=1)
    x, _, bad = ds.sample(0)
    assert bad == (str(tmp_path / "cut.nii.gz"),) and x.shape == (1, 4, 4, 4)
    _, _, bad = ds.sample(2)  # junk wraps round to cut (known damaged) then good
    assert bad == (str(tmp_path / "junk.npy"), str(tmp_path / "cut.nii.gz"))
    assert set(ds.damaged) == {str(tmp_path / "cut.nii.gz"), str(tmp_path / "junk.npy")}
    assert all(ds.damaged.values())
    survey = VolumeDataset(cases, 16).survey()  # headers only: the damaged are known before training
    assert survey["unreadable"] == [str(tmp_path / "cut.nii.gz"), str(tmp_path / "junk.npy")]
    assert survey["small"] == [str(tmp_path / "good.nii.gz")] and survey["spacings"] == {(3.0, 2.0, 1.0)}
    # all damaged: a clear error, not a loop
    only_bad = VolumeDataset([c for c in cases if c.paths[0].name != "good.nii.gz"], 4)
    with pytest.raises(RecipeError, match="none of the 2 volumes could be read"):
        only_bad[0]
    with pytest.raises(DamagedVolume) as info:
        read_volume(cases[2])
    assert info.value.path == str(tmp_path / "junk.npy")
    # valid headers, voxels cut short: memory-mapped .npy and uncompressed .nii
    short = tmp_path / "short"
    short.mkdir()
    np.save(short / "s.npy", _ramp((8, 8, 8)))
    (short / "s.npy").write_bytes((short / "s.npy").read_bytes()[:-100])
    raw_nii = _nifti(short / "n.nii", _ramp((8, 8, 8), np.int16))
    raw_nii.write_bytes(raw_nii.read_bytes()[:-100])
    np.save(short / "ok.npy", _ramp((8, 8, 8)))
    ds = VolumeDataset(find_volumes(short), 4)
    assert [tuple(ds.sample(i)[2]) for i in range(3)] == [
        (str(short / "n.nii"),),
        (),
        (str(short / "s.npy"), str(short / "n.nii")),  # wraps round past the known-damaged n.nii
    ]
    assert sorted(ds.damaged) == [str(short / "n.nii"), str(short / "s.npy")]


# ------------------------------------------------------------------------------------------- intensity


def test_intensity_rules_exact_values() -> None:
    vol = np.concatenate([np.zeros(99), np.arange(1, 202)]).astype(np.float32).reshape(1, 10, 30)
    rule = parse_intensity("percentile")
    lo, hi, mean, std, vmin = rule.stats(vol)
    # foreground 1..201 (201 values): 0.5 / 99.5 percentiles at positions 1 and 199 -> 2 and 200
    assert (lo, hi, vmin) == (2.0, 200.0, 0.0)
    clipped = np.array([2.0] * 2 + list(range(3, 200)) + [200.0] * 2)
    assert mean == pytest.approx(101.0) and std == pytest.approx(clipped.std())
    out = rule.apply(np.array([0.0, 2.0, 101.0, 201.0]), (lo, hi, mean, std, vmin))
    np.testing.assert_allclose(out, [-99 / std, -99 / std, 0.0, 99 / std], rtol=1e-6)
    assert rule.background((lo, hi, mean, std, vmin)) == pytest.approx(-99 / std)
    ct = parse_intensity("ct:-100,100")
    np.testing.assert_allclose(
        ct.apply(np.array([-1000.0, -100.0, 0.0, 50.0, 500.0]), ct.stats(vol)), [0, 0, 0.5, 0.75, 1]
    )
    assert parse_intensity("ct:lung").low == -1350 and parse_intensity("CT:Brain").high == 80
    assert parse_intensity("percentile:1,99").low == 1.0
    none = parse_intensity("none")
    assert none.apply(np.array([-3.0, 7.0]), none.stats(vol)).tolist() == [-3.0, 7.0]
    # a constant volume: all of it is foreground, std 0 -> only centred
    const = parse_intensity("percentile")
    s = const.stats(np.full((2, 2, 2), 5.0))
    assert const.apply(np.array([5.0]), s).tolist() == [0.0]
    for bad in ("percentil", "ct:", "ct:5,1", "percentile:0,101", "ct:liver", "zscore"):
        with pytest.raises(RecipeError, match="percentile:LO,HI.*ct:L,H.*none"):
            parse_intensity(bad)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-2000, 3000, allow_nan=False, width=32), min_size=8, max_size=64),
    low=st.floats(0, 10),
    high=st.floats(90, 100),
)
def test_percentile_rule_z_scores_the_clipped_foreground(values: list[float], low: float, high: float) -> None:
    vol = np.asarray(values, np.float32).reshape(-1, 1, 1)
    rule = parse_intensity(f"percentile:{low},{high}")
    stats = rule.stats(vol)
    out = rule.apply(vol, stats).reshape(-1).astype(np.float64)
    fg = vol.reshape(-1) > vol.min()
    if not fg.any():
        fg[:] = True
    assert abs(out[fg].mean()) < 1e-3 * max(1.0, np.abs(out).max())
    if stats[3] > 1e-3:
        assert out[fg].std() == pytest.approx(1.0, rel=1e-3)
    assert rule.background(stats) == pytest.approx(out.min(), abs=1e-4)  # padding = the darkest voxel
    ct = parse_intensity("ct:bone")
    ct_out = ct.apply(vol, ct.stats(vol)).reshape(-1)
    assert ct_out.min() >= 0 and ct_out.max() <= 1
    assert np.all(np.diff(ct_out[np.argsort(vol.reshape(-1), kind="stable")]) >= 0)  # monotone


# ------------------------------------------------------------------------------------------- crops


def test_padding_counted_filled_with_background_or_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "small.npy", np.full((2, 6, 3), 7.0, np.float32) + _ramp((2, 6, 3)))
    np.save(tmp_path / "big.npy", _ramp((6, 6, 6)))
    cases = find_volumes(tmp_path)
    ds = VolumeDataset(cases, (4, 4, 4), intensity="none", train=False)
    x = ds[1]  # small.npy, centred: D 2 -> offset 1, W 3 -> offset 0
    assert ds.padded_count == 1 and ds.padded == {str(tmp_path / "small.npy")}
    assert float(x[0, 0].max()) == 7.0 and float(x[0, 3].max()) == 7.0  # background = the minimum
    src = np.load(tmp_path / "small.npy")
    np.testing.assert_array_equal(x[0, 1:3, :, :3].numpy(), src[:, 1:5, :])
    assert (x[0, :, :, 3] == 7.0).all()
    ds[0]
    assert ds.padded_count == 1
    refuse = VolumeDataset(cases, (4, 4, 4), pad="refuse")
    refuse[0]
    with pytest.raises(RecipeError, match=r"small\.npy.*2x6x3.*smaller than the crop 4x4x4"):
        refuse[1]
    assert refuse.survey()["small"] == [str(tmp_path / "small.npy")]


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)),
    crop=st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 7)),
    index=st.integers(0, 50),
)
def test_crop_is_a_window_of_the_normalised_volume(shape: tuple[int, ...], crop: tuple[int, ...], index: int) -> None:
    """Every voxel of a crop is either background or a normalised source voxel, the window contiguous."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = (_ramp(shape) * 3 + 1).astype(np.float32)
        np.save(Path(tmp) / "v.npy", src)
        ds = VolumeDataset([VolumeCase((Path(tmp) / "v.npy",))], crop, intensity="none", seed=index)
        x = ds[0].numpy()[0]
        assert x.shape == crop
        # undo flips by matching: the crop's non-background box must equal some flipped window of src
        box = [min(s, c) for s, c in zip(shape, crop)]
        assert int((x != 1.0).sum()) + int((x == 1.0).sum()) == int(np.prod(crop))
        assert int(np.sum(x > 0)) >= int(np.prod(box)) - 1  # only src's minimum (1.0) can coincide
        vals = set(np.unique(x).tolist()) - {1.0}
        assert vals <= set(src.reshape(-1).tolist())
        assert ds.padded_count == int(any(s < c for s, c in zip(shape, crop)))
        # evaluation: exactly the centred window, or the whole axis centred in background
        centred = VolumeDataset(ds.cases, crop, intensity="none", train=False)[0].numpy()[0]
        expect = np.full(crop, 1.0, np.float32)
        src_sl, dst_sl = [], []
        for n, c in zip(shape, crop):
            if n >= c:
                src_sl.append(slice((n - c) // 2, (n - c) // 2 + c))
                dst_sl.append(slice(0, c))
            else:
                src_sl.append(slice(0, n))
                dst_sl.append(slice((c - n) // 2, (c - n) // 2 + n))
        expect[tuple(dst_sl)] = src[tuple(src_sl)]
        np.testing.assert_array_equal(centred, expect)


def test_crops_reproducible_per_seed_epoch_index(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=(12, 12, 12)).astype(np.float32))
    cases = find_volumes(tmp_path)
    a, b = VolumeDataset(cases, 5, seed=3), VolumeDataset(cases, 5, seed=3)
    assert torch.equal(a[0], b[0])
    draws = {a[0].sum().item()}
    for epoch in range(1, 6):
        a.set_epoch(epoch)
        draws.add(a[0].sum().item())
    assert len(draws) > 1  # crops and flips change between epochs
    centred = VolumeDataset(cases, 5, train=False)
    full = torch.from_numpy(
        centred.rule.apply(np.load(tmp_path / "v.npy"), centred.rule.stats(np.load(tmp_path / "v.npy")))
    )
    torch.testing.assert_close(centred[0][0], full[3:8, 3:8, 3:8])


# ------------------------------------------------------------------------------------------- cache


def test_cache_reused_without_touching_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _nifti(tmp_path / "data" / "v.nii.gz", _ramp((6, 7, 8), np.int16))
    cache = tmp_path / "cache"
    cases = find_volumes(tmp_path / "data")
    first = VolumeDataset(cases, 4, cache_dir=cache, train=False)[0]
    stored = sorted(p.name for p in cache.iterdir())
    assert sorted(name.split(".", 1)[1] for name in stored) == [
        "json",
        "npy",
        "sparsify-volume-cache",  # the marker
        "stats.json",
    ]  # and no temporaries left
    (voxels,) = cache.glob("*.npy")
    assert np.load(voxels).dtype == np.int16  # raw voxels, their own dtype

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the source was decoded again")

    monkeypatch.setattr(_volume_io, "load_raw", no_decoding)
    monkeypatch.setattr(IntensityRule, "stats", no_decoding)  # nor are its statistics recomputed
    again = VolumeDataset(cases, 4, cache_dir=cache, train=False)  # a new run, same cache folder
    assert torch.equal(again[0], first)
    monkeypatch.undo()
    # a changed source (new mtime/size) is decoded again into a new entry
    _nifti(src, _ramp((6, 7, 8), np.int16) * 2)
    os.utime(src, ns=(1, 1))
    changed = VolumeDataset(cases, 4, cache_dir=cache, train=False, intensity="none")[0]
    assert len(list(cache.glob("*.npy"))) == 2
    renormalised = VolumeDataset(cases, 4, cache_dir=cache, train=False)[0]
    assert len(list(cache.glob("*.stats.json"))) == 3  # percentile (old, new source) and none (new)
    torch.testing.assert_close(renormalised, VolumeDataset(cases, 4, train=False)[0])  # as without a cache
    assert torch.equal(changed, VolumeDataset(cases, 4, train=False, intensity="none")[0])
    assert torch.equal(changed, 2 * VolumeDataset(cases, 4, cache_dir=cache, train=False, intensity="none")[0] / 2)
    assert not torch.equal(changed, first)


def test_unwritable_cache_slows_down_but_does_not_stop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _nifti(tmp_path / "data" / "v.nii.gz", _ramp((6, 7, 8), np.int16))
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    cases = find_volumes(tmp_path / "data")
    x = VolumeDataset(cases, 4, cache_dir=blocked, train=False)[0]
    assert torch.equal(x, VolumeDataset(cases, 4, train=False)[0])
    assert "cannot be written" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- synthetic, loader


def test_synthetic_volumes_deterministic_with_two_classes() -> None:
    a, b = SyntheticVolumes(6, (12, 16, 16), channels=2, seed=5), SyntheticVolumes(6, (12, 16, 16), channels=2, seed=5)
    assert a[0].shape == (2, 12, 16, 16) and a[0].dtype == torch.float32
    assert torch.equal(a[3], b[3]) and not torch.equal(a[3], a[5])
    assert not torch.equal(a[3], SyntheticVolumes(6, (12, 16, 16), channels=2, seed=6)[3])
    assert [a.sample(i)[1] for i in range(4)] == [0, 1, 0, 1] == a.labels[:4]
    assert abs(float(a[0].mean())) < 0.5  # z-scored foreground
    with pytest.raises(IndexError):
        a[6]
    # the classes differ as documented: few large blobs cover more of the volume than many small ones
    from sparsify.recipes._synthetic_volumes import phantom

    cover = [[float((phantom(i, (24, 24, 24), 1, seed=1)[0] > 0.25).mean()) for i in range(k, 20, 2)] for k in (0, 1)]
    assert min(cover[0]) > 0 and min(cover[1]) > 0 and np.mean(cover[0]) > 2 * np.mean(cover[1])


def test_dataloader_two_workers_matches_one_process(tmp_path: Path) -> None:
    for i in range(6):
        np.save(tmp_path / f"v{i}.npy", np.random.default_rng(i).normal(size=(8, 9, 10)).astype(np.float32))
    (tmp_path / "v9.npy").write_bytes(b"garbage")
    ds = VolumeDataset(find_volumes(tmp_path), (6, 6, 6), seed=2)
    ref = torch.stack([ds[i] for i in range(len(ds))])
    ds2 = VolumeDataset(find_volumes(tmp_path), (6, 6, 6), seed=2)
    batches = list(DataLoader(ds2, batch_size=2, num_workers=2))
    assert torch.equal(torch.cat(batches), ref)
    assert ds2.damaged == {}  # counted in the workers, not here (documented)
    assert list(ds.damaged) == [str(tmp_path / "v9.npy")]
    # two workers filling one cache at once (each writes atomically): the same samples
    _nifti(tmp_path / "v5.nii.gz", np.random.default_rng(9).normal(size=(10, 9, 8)).astype(np.float32))
    cases = find_volumes(tmp_path)
    plain = torch.stack([VolumeDataset(cases, (6, 6, 6), seed=2)[i] for i in range(len(cases))])
    cached = VolumeDataset(cases, (6, 6, 6), seed=2, cache_dir=tmp_path / "cache")
    assert torch.equal(torch.cat(list(DataLoader(cached, batch_size=1, num_workers=2))), plain)
    assert not list((tmp_path / "cache").glob("*.tmp"))
