"""MRC / MRCS files: micrographs, movies, particle stacks and 3-D maps (via ``mrcfile``).

Arrays come back in numpy order: images (y, x), stacks and movies (n, y, x), volumes (z, y, x),
always float32. Pixel/voxel sizes are in Å (``None`` when the header leaves them unset), origins
in Å as (x, y, z). Every problem with a file is raised as :class:`~cryodask.errors.InputError`
naming the file.

Reading is memory-mapped, so a stack read touches only the requested images. Old files without
the ``MAP`` ID (e.g. some RELION 2 / SPIDER-converted stacks) are accepted when the rest of the
header is consistent with the file size.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import mrcfile
import numpy as np
from mrcfile.utils import data_shape_from_header, dtype_from_mode

from ..errors import InputError

HEADER_BYTES = 1024
SUPPORTED_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
_IMOD_STAMP = 1146047817  # 'IMOD' in the imodStamp field


@contextmanager
def _quiet():
    """Silence mrcfile's permissive-mode warnings (we run our own checks first)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _axis_order(header, ndim: int) -> tuple[int, ...] | None:
    """Transpose that brings file axes (sections, rows, columns) to (z, y, x); None if identity."""
    cms = (int(header.mapc), int(header.mapr), int(header.maps))
    if sorted(cms) != [1, 2, 3] or cms == (1, 2, 3):
        return None
    labels = [cms[2], cms[1], cms[0]]  # numpy axis i holds file axis labels[i] (1=x, 2=y, 3=z)
    if ndim == 3:
        return tuple(labels.index(k) for k in (3, 2, 1))
    if ndim == 2 and cms[2] == 3:  # single image: only a row/column swap makes sense
        return (1, 0)
    return None


def header_info(path: str | Path) -> dict:
    """Read and sanity-check an MRC header without touching the data.

    Returns a dict with ``shape`` (numpy order after applying mapc/mapr/maps: (y, x) for a
    single image, (n, y, x) for stacks/movies/volumes), ``dtype`` (numpy dtype of the file's
    data), ``mode`` (MRC mode), ``pixel_size`` (Å, x axis; None when 0/unset), ``origin``
    (Å, (x, y, z)), ``data_offset`` (bytes), ``axis_order`` (transpose or None) and ``ispg``.

    Raises InputError for: missing file, not an MRC file, unsupported mode, non-positive
    dimensions, truncated data (stating expected vs actual bytes).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found" if not path.exists() else "not a regular file")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise InputError(path, f"not an MRC file (only {size} bytes; an MRC header needs {HEADER_BYTES})")
    try:
        with _quiet(), mrcfile.open(path, header_only=True, permissive=True) as m:
            h = m.header.copy()
    except Exception as err:  # mrcfile raises ValueError/OSError on hopeless files
        raise InputError(path, f"not an MRC file ({err})") from None
    has_id = bytes(h.map)[:3] == b"MAP"
    mode = int(h.mode)
    nx, ny, nz, nsymbt = int(h.nx), int(h.ny), int(h.nz), int(h.nsymbt)
    if not has_id and (mode not in SUPPORTED_MODES or min(nx, ny, nz) <= 0 or nsymbt < 0):
        raise InputError(path, "not an MRC file (no 'MAP ' ID and the header fields are inconsistent)")
    if mode not in SUPPORTED_MODES:
        raise InputError(path, f"unsupported MRC mode {mode} (supported: {sorted(SUPPORTED_MODES)})")
    if min(nx, ny, nz) <= 0:
        raise InputError(path, f"invalid MRC dimensions nx={nx} ny={ny} nz={nz} (must be positive)")
    dtype = dtype_from_mode(mode)
    if mode == 0 and int(h.imodStamp) == _IMOD_STAMP and not int(h.imodFlags) & 1:
        dtype = np.dtype(np.uint8)  # IMOD marks unsigned bytes this way
    expected = HEADER_BYTES + max(nsymbt, 0) + nx * ny * nz * dtype.itemsize
    if size < expected:
        hint = "" if has_id else " (or not an MRC file: no 'MAP ' ID)"
        raise InputError(path, f"truncated MRC{hint}: header says {nz}×{ny}×{nx} {dtype.name} = "
                               f"{expected} bytes with header, file has {size} bytes")
    shape = data_shape_from_header(h)
    if len(shape) == 4:
        raise InputError(path, f"MRC volume stacks (ispg {int(h.ispg)}) are not supported")
    order = _axis_order(h, len(shape))
    if order is not None:
        shape = tuple(shape[i] for i in order)
    mx, cella_x = int(h.mx), float(h.cella.x)
    pixel = cella_x / mx if mx > 0 and cella_x > 0 else None
    return {
        "shape": tuple(int(s) for s in shape),
        "dtype": dtype,
        "mode": mode,
        "pixel_size": pixel,
        "origin": (float(h.origin.x), float(h.origin.y), float(h.origin.z)),
        "data_offset": HEADER_BYTES + nsymbt,
        "axis_order": order,
        "ispg": int(h.ispg),
    }


@contextmanager
def _mapped(path: Path, info: dict):
    """Memory-mapped data array in (z, y, x)/(y, x) order, valid inside the ``with`` block."""
    with _quiet(), mrcfile.mmap(path, mode="r", permissive=True) as m:
        data = m.data
        if data is None:
            raise InputError(path, "MRC data block could not be read")
        if info["dtype"] == np.uint8 and data.dtype.itemsize == 1:
            data = data.view(np.uint8)
        if info["axis_order"] is not None:
            data = data.transpose(info["axis_order"])
        yield data


def _check_finite(path: Path, arr: np.ndarray) -> np.ndarray:
    bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise InputError(path, f"contains {bad} NaN/Inf pixels")
    return arr


def read_mrc(path: str | Path, *, frame_average: bool = True) -> tuple[np.ndarray, float | None]:
    """Read a whole MRC file as float32.

    Returns ``(array, pixel_size_Å_or_None)``. A single image gives (y, x). A 3-D file gives
    (y, x) — the average over its frames (a movie) — when ``frame_average`` is True, else
    the full (z, y, x) array. Raises InputError for bad files and for NaN/Inf pixels.
    """
    path = Path(path)
    info = header_info(path)
    with _mapped(path, info) as data:
        if data.ndim == 3 and frame_average:
            acc = np.zeros(data.shape[1:], np.float64)
            for frame in data:  # one frame in memory at a time
                acc += frame
            out = (acc / data.shape[0]).astype(np.float32)
        else:
            out = np.array(data, dtype=np.float32)
    return _check_finite(path, out), info["pixel_size"]


def read_stack(path: str | Path, indices=None) -> np.ndarray:
    """Images of an MRCS stack as float32 (n, y, x).

    ``indices``: 0-based image numbers (any order, repeats allowed); None reads all. Only the
    requested images are read from disk. A single-image file still gives (1, y, x).
    """
    path = Path(path)
    info = header_info(path)
    with _mapped(path, info) as data:
        if data.ndim == 2:
            data = data[None]
        n = data.shape[0]
        if indices is None:
            out = np.array(data, dtype=np.float32)
        else:
            idx = np.asarray(indices, dtype=np.int64).reshape(-1)
            bad = idx[(idx < 0) | (idx >= n)]
            if bad.size:
                raise InputError(path, f"image index {int(bad[0])} (0-based) out of range: stack has {n} images")
            out = np.empty((idx.size,) + data.shape[1:], np.float32)
            order = np.argsort(idx, kind="stable")  # read in file order
            for k in order:
                out[k] = data[idx[k]]
    return _check_finite(path, out)


def read_map(path: str | Path) -> tuple[np.ndarray, float | None]:
    """Read a 3-D map: ``(volume float32 (z, y, x), voxel_size_Å_or_None)``."""
    vol, voxel = read_mrc(path, frame_average=False)
    if vol.ndim != 3:
        raise InputError(path, f"expected a 3-D map, file holds a single {vol.shape[0]}×{vol.shape[1]} image")
    return vol, voxel


def _write_atomic(path: str | Path, fill) -> None:
    """Create ``path`` via a temporary file in the same folder, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        with mrcfile.new(tmp, overwrite=True) as m:
            fill(m)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_map(path: str | Path, volume: np.ndarray, voxel_size: float, origin=(0.0, 0.0, 0.0)) -> None:
    """Write a (z, y, x) volume as an MRC map: mode 2, ispg 1, nstart 0, mx/my/mz = nx/ny/nz,
    cella = voxel_size·n (Å), origin (x, y, z) in Å, header statistics filled."""
    volume = np.ascontiguousarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"write_map needs a 3-D (z, y, x) array, got shape {volume.shape}")

    def fill(m):
        m.set_data(volume)
        m.set_volume()
        m.voxel_size = float(voxel_size)
        m.nstart = (0, 0, 0)
        m.header.origin = tuple(float(o) for o in origin)
        m.update_header_stats()

    _write_atomic(path, fill)


def write_stack(path: str | Path, stack: np.ndarray, pixel_size: float) -> None:
    """Write an (n, y, x) image stack as .mrcs: mode 2, ispg 0, pixel size (Å) in x and y."""
    stack = np.ascontiguousarray(stack, dtype=np.float32)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3:
        raise ValueError(f"write_stack needs an (n, y, x) array, got shape {stack.shape}")

    def fill(m):
        m.set_data(stack)
        m.set_image_stack()
        m.voxel_size = float(pixel_size)
        m.update_header_stats()

    _write_atomic(path, fill)


def write_image(path: str | Path, image: np.ndarray, pixel_size: float) -> None:
    """Write a single (y, x) image (a micrograph) as a 2-D MRC: mode 2, nz = 1, pixel size in Å."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"write_image needs a 2-D (y, x) array, got shape {image.shape}")

    def fill(m):
        m.set_data(image)
        m.voxel_size = float(pixel_size)
        m.update_header_stats()

    _write_atomic(path, fill)
