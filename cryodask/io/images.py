"""Micrograph files of any supported format → one 2-D float32 image (y, x).

Formats, chosen by extension: ``.mrc``/``.mrcs``/``.st`` (movies are frame-averaged),
``.tif``/``.tiff`` (multi-page files are frame-averaged), ``.png`` (8- or 16-bit grayscale).
Row 0 of the array is the first row stored in the file. Pixel sizes (Å) come only from MRC
headers; other formats give ``None``. Every problem is an InputError naming the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from . import mrc

MRC_EXT = {".mrc", ".mrcs", ".st", ".map"}
TIFF_EXT = {".tif", ".tiff"}
PNG_EXT = {".png"}
_GRAY_PNG_MODES = {"L", "I", "I;16", "I;16B", "I;16L", "F"}
_CHANNEL_NAMES = {2: "grayscale+alpha", 3: "RGB", 4: "RGBA"}


def _ext(path: Path) -> str:
    ext = path.suffix.lower()
    if ext not in MRC_EXT | TIFF_EXT | PNG_EXT:
        raise InputError(path, f"unsupported micrograph format '{ext or '(no extension)'}' "
                               "(use .mrc, .mrcs, .st, .tif, .tiff or .png)")
    if not path.is_file():
        raise InputError(path, "file not found")
    return ext


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, arr = series.axes, series.asarray()
    except Exception as err:
        raise InputError(path, f"unreadable or corrupt TIFF file ({type(err).__name__}: {err})") from None
    if "S" in axes and arr.shape[axes.index("S")] > 1:
        n = arr.shape[axes.index("S")]
        raise InputError(path, f"is a {_CHANNEL_NAMES.get(n, f'{n}-channel')} TIFF; expected a 2-D grayscale image")
    arr = np.squeeze(arr) if arr.ndim > 3 else arr
    if arr.ndim == 3:  # multi-page: movie frames
        acc = np.zeros(arr.shape[1:], np.float64)
        for frame in arr:
            acc += frame
        arr = acc / arr.shape[0]
    return arr


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode not in _GRAY_PNG_MODES:
                bands = len(img.getbands())
                what = "palette (colour-mapped)" if mode == "P" else _CHANNEL_NAMES.get(bands, f"{bands}-band")
                raise InputError(path, f"is a {what} PNG (mode {mode}); expected an 8- or 16-bit grayscale image")
            arr = np.asarray(img)
    except InputError:
        raise
    except Exception as err:
        raise InputError(path, f"unreadable or corrupt PNG file ({type(err).__name__}: {err})") from None
    return arr


def read_micrograph(path: str | Path, *, expected_shape=None) -> tuple[np.ndarray, float | None]:
    """Read one micrograph as float32 (y, x); returns ``(image, pixel_size_Å_or_None)``.

    ``expected_shape``: (ny, nx) that the image must have (e.g. the first micrograph's);
    a mismatch is an InputError. Raises InputError for unsupported extensions, colour or
    non-2-D data, NaN/Inf pixels and unreadable files.
    """
    path = Path(path)
    ext = _ext(path)
    pixel = None
    if ext in MRC_EXT:
        img, pixel = mrc.read_mrc(path, frame_average=True)
    elif ext in TIFF_EXT:
        img = _read_tiff(path)
    else:
        img = _read_png(path)
    if img.ndim != 2 or min(img.shape) < 2:
        dims = "1-D" if img.ndim < 2 or min(img.shape) < 2 else f"{img.ndim}-D"
        raise InputError(path, f"is {dims} data of shape {tuple(img.shape)}; expected a 2-D grayscale image")
    img = np.asarray(img, dtype=np.float32)
    bad = img.size - int(np.count_nonzero(np.isfinite(img)))
    if bad:
        raise InputError(path, f"contains {bad} NaN/Inf pixels")
    if expected_shape is not None and tuple(img.shape) != tuple(expected_shape):
        raise InputError(path, f"size {img.shape[0]}×{img.shape[1]} (ny×nx) differs from the expected "
                               f"{expected_shape[0]}×{expected_shape[1]}")
    return img, pixel


def micrograph_shape(path: str | Path) -> tuple[int, int]:
    """(ny, nx) of a micrograph, read from the header only (for building lazy graphs)."""
    path = Path(path)
    ext = _ext(path)
    if ext in MRC_EXT:
        shape = mrc.header_info(path)["shape"]
    elif ext in TIFF_EXT:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape = tuple(n for n, a in zip(series.shape, series.axes) if a != "S")
        except Exception as err:
            raise InputError(path, f"unreadable or corrupt TIFF file ({type(err).__name__}: {err})") from None
    else:
        from PIL import Image

        try:
            with Image.open(path) as img:
                shape = (img.size[1], img.size[0])
        except Exception as err:
            raise InputError(path, f"unreadable or corrupt PNG file ({type(err).__name__}: {err})") from None
    if len(shape) < 2:
        raise InputError(path, f"is 1-D data of shape {shape}; expected a 2-D grayscale image")
    return int(shape[-2]), int(shape[-1])
