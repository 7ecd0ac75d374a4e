"""Readers for volume files: NIfTI, ``.npy``/``.npz`` and DICOM series folders (see :mod:`.volumes`).

Every reader returns arrays in the *lead-first* layout the rest of the code uses: a 3-D array is
(D, H, W); a 4-D file is (L, D, H, W), L being its fourth axis (time points, echoes or channels).
Any decoding failure is raised as :class:`DamagedVolume` naming the file and the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .cli import RecipeError, warn

__all__ = [
    "VOLUME_SUFFIXES",
    "DamagedVolume",
    "volume_suffix",
    "is_dicom_file",
    "is_dicom_folder",
    "probe_shape",
    "probe_spacing",
    "load_raw",
    "cached_raw",
    "cached_stats",
    "NPZ_KEYS",
    "CACHE_MARKER",
]

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy", ".npz")
NPZ_KEYS = ("image", "data", "volume")
SCANS_EXTRA_HINT = "pip install 'sparsify-cnn[scans]'"
# A file marking a folder as a voxel cache: the folder search skips it, so a cache kept inside the
# data folder is not read as more volumes.
CACHE_MARKER = ".sparsify-volume-cache"


class DamagedVolume(RecipeError):
    """A volume file (or DICOM folder) that cannot be read; the data set skips it and names it.

    Attributes:
        path: the file or folder.
        why: what went wrong, in words.
    """

    def __init__(self, path: str | os.PathLike[str], why: str) -> None:
        self.path = str(path)
        self.why = why
        super().__init__(f"cannot read volume '{self.path}': {why}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across DataLoader workers
        return (DamagedVolume, (self.path, self.why))


def volume_suffix(name: str) -> str | None:
    """The volume suffix ``name`` ends with (case-insensitive), or None."""
    low = name.lower()
    for suffix in (".nii.gz", ".nii", ".npy", ".npz"):
        if low.endswith(suffix):
            return suffix
    return None


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` file, or a file carrying the DICOM marker ``DICM`` at byte 128."""
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_folder(folder: Path, filenames: list[str]) -> bool:
    """True when ``folder`` directly holds at least one DICOM file (by suffix or marker)."""
    return any(not n.startswith(".") and is_dicom_file(folder / n) for n in filenames)


# --------------------------------------------------------------------------------------------- shapes


def _squeeze_tail(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing length-1 axes beyond the third ((x, y, z, 1) is a 3-D volume)."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _check_rank(path: Path, shape: tuple[int, ...], order: str) -> None:
    if len(shape) < 3:
        raise DamagedVolume(path, f"holds a {len(shape)}-D array {shape}; a volume needs 3 axes ({order})")
    if len(shape) > 4:
        raise DamagedVolume(
            path, f"holds a {len(shape)}-D array {shape}; at most 4 axes are read (a 3-D volume plus time or channels)"
        )


def _npy_header(fileobj: Any) -> tuple[tuple[int, ...], bool]:
    version = np.lib.format.read_magic(fileobj)
    if version == (1, 0):
        shape, fortran, _ = np.lib.format.read_array_header_1_0(fileobj)
    else:
        shape, fortran, _ = np.lib.format.read_array_header_2_0(fileobj)
    return tuple(shape), fortran


def _npz_key(names: list[str]) -> str:
    arrays = [n[:-4] if n.endswith(".npy") else n for n in names]
    for key in NPZ_KEYS:
        if key in arrays:
            return key
    if not arrays:
        raise ValueError("the archive holds no arrays")
    return arrays[0]


def probe_shape(path: Path) -> tuple[int, ...]:
    """The lead-first shape of a volume file from its header only: (D, H, W) or (L, D, H, W).

    DICOM folders are not probed (they are always one 3-D channel).

    Raises:
        DamagedVolume: unreadable header, or fewer than 3 / more than 4 axes.
    """
    suffix = volume_suffix(path.name)
    try:
        if suffix in (".nii", ".nii.gz"):
            import nibabel as nib

            xyz = _squeeze_tail(nib.load(str(path)).shape)
            _check_rank(path, xyz, "x, y, z")
            return tuple(reversed(xyz[:3])) if len(xyz) == 3 else (xyz[3], *reversed(xyz[:3]))
        if suffix == ".npy":
            with open(path, "rb") as f:
                shape, _ = _npy_header(f)
        elif suffix == ".npz":
            with zipfile.ZipFile(path) as z:
                key = _npz_key(z.namelist())
                with z.open(key + ".npy") as f:
                    shape, _ = _npy_header(f)
        else:
            raise DamagedVolume(path, "not a volume file")
    except DamagedVolume:
        raise
    except ImportError as exc:
        raise RecipeError(f"reading '{path}' needs nibabel: {SCANS_EXTRA_HINT} ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - any header failure means a damaged file
        raise DamagedVolume(path, f"{type(exc).__name__}: {exc}") from exc
    shape = tuple(int(s) for s in shape)
    _check_rank(path, shape, "D, H, W or C, D, H, W")
    return shape


def probe_spacing(path: Path) -> tuple[float, ...] | None:
    """The (d, h, w) spacing in mm from the header only (NIfTI zooms, an ``.npz`` ``spacing`` array, the
    first DICOM file's slice thickness and pixel spacing), or None when the file does not say.

    Raises:
        DamagedVolume: when the header cannot be read.
    """
    try:
        if path.is_dir():
            import pydicom

            first = _dicom_files(path)[0]
            ds = pydicom.dcmread(str(first), stop_before_pixels=True)
            row, col = (float(v) for v in ds.PixelSpacing)
            dz = float(getattr(ds, "SpacingBetweenSlices", 0) or getattr(ds, "SliceThickness", 0) or 0)
            return (dz, row, col) if dz > 0 else None
        suffix = volume_suffix(path.name)
        if suffix in (".nii", ".nii.gz"):
            import nibabel as nib

            zooms = tuple(float(z) for z in nib.load(str(path)).header.get_zooms()[:3])
            return tuple(reversed(zooms)) if len(zooms) == 3 and all(z > 0 for z in zooms) else None
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return _npz_spacing(data)
        return None
    except (AttributeError, IndexError, TypeError, ValueError, KeyError) as exc:
        if path.is_dir():
            return None  # a series without spacing tags
        raise DamagedVolume(path, f"{type(exc).__name__}: {exc}") from exc
    except ImportError:
        return None
    except Exception as exc:  # noqa: BLE001 - any header failure means a damaged file
        raise DamagedVolume(path, f"{type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------------- reading


def _as_numeric(path: Path, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise DamagedVolume(path, f"holds {arr.dtype} values; volumes must be numbers")
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8)
    if arr.dtype == np.float64:
        return arr.astype(np.float32)
    return arr


def _read_nifti(path: Path, mmap: bool) -> tuple[np.ndarray, tuple[float, ...] | None]:
    import nibabel as nib

    img = nib.load(str(path), mmap="r" if mmap else False)
    proxy = img.dataobj
    # An uncompressed file without intensity scaling is read in place (memory-mapped, like a .npy);
    # otherwise dataobj decodes it whole and applies the header's scl_slope/scl_inter.
    arr = None
    if mmap and not path.name.lower().endswith(".gz") and (proxy.slope, proxy.inter) == (1.0, 0.0):
        arr = proxy.get_unscaled()
        arr = arr if isinstance(arr, np.memmap) and arr.dtype.kind in "iuf" else None
    mapped = arr is not None
    arr = np.asanyarray(proxy) if arr is None else arr
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    arr = arr.reshape(_squeeze_tail(arr.shape))
    _check_rank(path, arr.shape, "x, y, z")
    # NIfTI's (x, y, z[, t]) -> ([t,] z, y, x); no reorientation to a standard frame.
    arr = arr.transpose(2, 1, 0) if arr.ndim == 3 else arr.transpose(3, 2, 1, 0)
    spacing = tuple(reversed(zooms)) if all(z > 0 for z in zooms) else None
    if mapped:  # NIfTI stores x fastest, so this (z, y, x) view is C-ordered already
        return arr, spacing
    return np.ascontiguousarray(_as_numeric(path, arr)), spacing


def _npz_spacing(data: Any) -> tuple[float, ...] | None:
    if "spacing" not in data.files:
        return None
    sp = np.asarray(data["spacing"], dtype=np.float64).reshape(-1)
    return tuple(float(v) for v in sp[-3:]) if sp.size >= 3 else None


def _read_numpy(path: Path, mmap: bool) -> tuple[np.ndarray, tuple[float, ...] | None]:
    if path.name.lower().endswith(".npy"):
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        spacing = None
    else:
        with np.load(path, allow_pickle=False) as data:
            arr = data[_npz_key(list(data.files))]
            spacing = _npz_spacing(data)
    if arr.ndim > 4:
        arr = arr.reshape(_squeeze_tail(arr.shape))
    _check_rank(path, arr.shape, "D, H, W or C, D, H, W")
    if not isinstance(arr, np.memmap):
        arr = _as_numeric(path, arr)
    elif arr.dtype.kind not in "biuf":
        raise DamagedVolume(path, f"holds {arr.dtype} values; volumes must be numbers")
    return arr, spacing


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom_file(p))


def _read_dicom(folder: Path) -> tuple[np.ndarray, tuple[float, ...] | None]:
    try:
        import pydicom
    except ImportError as exc:
        raise RecipeError(f"'{folder}' is a DICOM series, and reading DICOM needs pydicom: {SCANS_EXTRA_HINT}") from exc
    slices = []
    for p in _dicom_files(folder):
        ds = pydicom.dcmread(str(p))
        if "PixelData" not in ds:
            continue  # a DICOMDIR or a report in the same folder
        slices.append(ds)
    if not slices:
        raise DamagedVolume(folder, "the folder's DICOM files hold no pixel data")
    # Sort along the slice normal when positions are present, else by InstanceNumber.
    try:
        ori = np.asarray(slices[0].ImageOrientationPatient, dtype=np.float64)
        normal = np.cross(ori[:3], ori[3:])
        keys = [float(np.dot(normal, np.asarray(s.ImagePositionPatient, dtype=np.float64))) for s in slices]
    except (AttributeError, ValueError, TypeError):
        keys = [float(getattr(s, "InstanceNumber", i)) for i, s in enumerate(slices)]
    order = np.argsort(np.asarray(keys), kind="stable")
    slices = [slices[i] for i in order]
    keys = [keys[i] for i in order]
    planes = []
    for s in slices:
        plane = s.pixel_array.astype(np.float32)
        slope = float(getattr(s, "RescaleSlope", 1) or 1)
        intercept = float(getattr(s, "RescaleIntercept", 0) or 0)
        planes.append(plane * slope + intercept)
    shapes = {p.shape for p in planes}
    if len(shapes) != 1 or planes[0].ndim != 2:
        raise DamagedVolume(folder, f"the slices differ in size or are not 2-D ({sorted(shapes)})")
    arr = np.stack(planes)
    spacing: tuple[float, ...] | None = None
    try:
        row, col = (float(v) for v in slices[0].PixelSpacing)
        if len(keys) > 1 and abs(keys[-1] - keys[0]) > 0:
            dz = abs(keys[-1] - keys[0]) / (len(keys) - 1)
        else:
            dz = float(getattr(slices[0], "SliceThickness", 0) or 0)
        spacing = (dz, row, col) if dz > 0 else None
    except (AttributeError, ValueError, TypeError):
        spacing = None
    return arr, spacing


def load_raw(path: Path, *, mmap: bool = True) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """Decode one file or DICOM folder to a lead-first array and its (d, h, w) spacing in mm (or None).

    ``.npy`` files come back memory-mapped when ``mmap`` (only the voxels later indexed are read).

    Raises:
        DamagedVolume: when the file cannot be decoded.
        RecipeError: when a needed reader (nibabel, pydicom) is missing.
    """
    try:
        if path.is_dir():
            return _read_dicom(path)
        suffix = volume_suffix(path.name)
        if suffix in (".nii", ".nii.gz"):
            try:
                import nibabel  # noqa: F401
            except ImportError as exc:
                raise RecipeError(f"reading '{path}' needs nibabel: {SCANS_EXTRA_HINT}") from exc
            return _read_nifti(path, mmap)
        if suffix in (".npy", ".npz"):
            return _read_numpy(path, mmap)
        raise DamagedVolume(path, f"not a volume file (accepted: {', '.join(VOLUME_SUFFIXES)} or a DICOM folder)")
    except (DamagedVolume, RecipeError):
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a damaged file
        raise DamagedVolume(path, f"{type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------------- cache


def _source_key(path: Path) -> str:
    """Identity of a source: resolved path, size and modification time (DICOM: of every file)."""
    import hashlib

    parts = [str(path.resolve())]
    entries = [path] + (_dicom_files(path) if path.is_dir() else [])
    for p in entries:
        st = p.stat()
        parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.blake2b("|".join(parts).encode(), digest_size=12).hexdigest()


def _atomic_write(target: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix="." + target.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cached_raw(path: Path, cache_dir: Path | None) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """:func:`load_raw`, through a cache of decompressed voxels as ``.npy`` files in ``cache_dir``.

    ``.npy`` sources, and uncompressed NIfTI files without intensity scaling, are memory-mapped in place
    (nothing to decompress). Other sources are decoded once
    and stored as ``<key>.npy`` (raw voxels, their own dtype) plus ``<key>.json`` (spacing), both written
    atomically, the key being the source's path, size and modification time; later reads, in this run or
    another, memory-map the cached copy without opening the source.
    """
    if cache_dir is None or (path.is_file() and path.name.lower().endswith(".npy")):
        return load_raw(path, mmap=True)
    try:
        key = _source_key(path)
    except OSError as exc:
        raise DamagedVolume(path, f"{type(exc).__name__}: {exc}") from exc
    npy, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if npy.exists() and meta.exists():
        try:
            spacing = json.loads(meta.read_text())["spacing"]
            arr = np.load(npy, mmap_mode="r", allow_pickle=False)
            return arr, (tuple(float(v) for v in spacing) if spacing is not None else None)
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt from the source
            pass
    arr, spacing = load_raw(path, mmap=path.name.lower().endswith(".nii"))
    if isinstance(arr, np.memmap):
        return arr, spacing  # read in place: a copy would gain nothing
    arr = np.ascontiguousarray(arr)
    record = json.dumps({"source": str(path), "spacing": list(spacing) if spacing is not None else None})
    try:
        _make_cache_dir(cache_dir)
        _atomic_write(meta, lambda f: f.write(record.encode()))
        _atomic_write(npy, lambda f: np.save(f, arr, allow_pickle=False))
    except OSError as exc:  # a full disk or a read-only cache slows the run down; it must not stop it
        _warn_once(f"volume cache '{cache_dir}' cannot be written ({exc}); reading without it")
        return arr, spacing
    return np.load(npy, mmap_mode="r", allow_pickle=False), spacing


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warn(message)


def _make_cache_dir(cache_dir: Path) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    marker = cache_dir / CACHE_MARKER
    if not marker.exists():
        marker.write_text("decompressed voxels and statistics written by sparsify; safe to delete\n")


def cached_stats(
    paths: tuple[Path, ...], tag: str, cache_dir: Path | None, compute: Callable[[], list[tuple[float, ...]]]
) -> list[tuple[float, ...]]:
    """Per-channel intensity statistics of one case, stored in ``cache_dir`` next to the voxels.

    ``tag`` names what the statistics depend on besides the sources (the rule, the time point); the
    sources' identities (path, size, modification time) are part of the key, so an edited file gets
    new statistics. Without ``cache_dir`` this is just ``compute()``.
    """
    if cache_dir is None:
        return compute()
    import hashlib

    try:
        ident = "|".join(_source_key(p) for p in paths) + "|" + tag
    except OSError:
        return compute()  # the source is gone: reading it will name it as damaged
    key = hashlib.blake2b(ident.encode(), digest_size=12).hexdigest()
    target = cache_dir / f"{key}.stats.json"
    if target.exists():
        try:
            return [tuple(float(v) for v in c) for c in json.loads(target.read_text())["stats"]]
        except Exception:  # noqa: BLE001 - a damaged entry is recomputed
            pass
    stats = compute()
    record = json.dumps({"sources": [str(p) for p in paths], "tag": tag, "stats": [list(c) for c in stats]})
    try:
        _make_cache_dir(cache_dir)
        _atomic_write(target, lambda f: f.write(record.encode()))
    except OSError as exc:
        _warn_once(f"volume cache '{cache_dir}' cannot be written ({exc}); reading without it")
    return stats
