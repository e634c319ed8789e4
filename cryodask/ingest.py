"""Ingest: micrograph files (MRC, MRC movies, PNG, TIFF) into the run's zarr store.

This is the input edge of the pipeline. File headers are checked first (cheap, in this
process); then one task per micrograph reads, frame-averages and validates the pixels while the
stack is written to ``STORE/micrographs`` (one micrograph per chunk). A file that fails any
check — unreadable, truncated, wrong size, not 2-D, NaN/Inf pixels — is skipped and recorded
with a one-line reason; every good file is still ingested.
"""
from __future__ import annotations

import glob
import logging
from collections import Counter
from pathlib import Path
from typing import Iterable

import dask
import dask.array as da
import numpy as np

from .errors import InputError
from .model import micrograph_dataset, microscope_attrs, open_group, provenance, write_group

log = logging.getLogger("cryodask")

__all__ = ["expand_inputs", "ingest_micrographs"]

_SUFFIXES = (".mrc", ".mrcs", ".st", ".tif", ".tiff", ".png")


def expand_inputs(patterns: Iterable[str]) -> list[Path]:
    """Paths and globs → sorted unique files; a directory means the micrographs inside it."""
    out: list[Path] = []
    for pat in patterns:
        p = Path(pat)
        if p.is_dir():
            out += [q for q in sorted(p.iterdir()) if q.suffix.lower() in _SUFFIXES]
            continue
        hits = sorted(glob.glob(str(pat)))
        if not hits and not any(ch in str(pat) for ch in "*?["):
            hits = [str(pat)]  # a plain missing path is reported as a bad input later
        out += [Path(h) for h in hits]
    seen, uniq = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            uniq.append(p)
    return uniq


def _read_or_nan(path: str, shape: tuple[int, int]) -> np.ndarray:
    """Read one micrograph; a file that fails the pixel checks becomes an all-NaN marker."""
    from .io.images import read_micrograph

    try:
        img, _ = read_micrograph(path, expected_shape=shape)
        return img[None].astype(np.float32)
    except InputError:
        return np.full((1,) + shape, np.nan, np.float32)


def _first_pixel_finite(block: np.ndarray) -> np.ndarray:
    """(b, ny, nx) → (b,) bool: False for the all-NaN markers of unreadable files."""
    return ~np.isnan(block[:, 0, 0])


def ingest_micrographs(paths: list[Path], store: str | Path, *, pixel_size: float | None = None,
                       voltage: float = 300.0, cs: float = 2.7, amplitude_contrast: float = 0.1,
                       resume: str | Path | None = None):
    """Write the good micrographs to ``store/micrographs``.

    Returns ``(dataset, bad)``: the lazily re-opened micrograph Dataset (only good ones) and a
    list of ``{"file", "reason"}`` for the skipped files. Without ``pixel_size`` the first good
    file's header value is used; if there is none, an :class:`InputError` is raised.
    """
    from .io.images import micrograph_shape, read_micrograph

    bad: list[dict[str, str]] = []
    shapes: dict[Path, tuple[int, int]] = {}
    header_apix = None
    for p in paths:
        try:
            shapes[p] = tuple(micrograph_shape(p))
        except InputError as e:
            bad.append({"file": str(p), "reason": str(e)})
            log.warning("skipping %s", e)
    if not shapes:
        raise InputError(None, "no readable micrographs among the inputs"
                         + (f" ({len(bad)} bad: {bad[0]['reason']})" if bad else ""))
    ref_shape = Counter(shapes.values()).most_common(1)[0][0]
    good = []
    for p, s in shapes.items():
        if s != ref_shape:
            msg = f"{p}: wrong size {s[1]}×{s[0]} px, the other micrographs are {ref_shape[1]}×{ref_shape[0]}"
            bad.append({"file": str(p), "reason": msg})
            log.warning("skipping %s", msg)
        else:
            good.append(p)
    if pixel_size is None:
        from .io.mrc import header_info

        found = [round(float(header_info(p).get("pixel_size") or 0), 4) for p in good
                 if p.suffix.lower() in (".mrc", ".mrcs", ".st")]
        found = [a for a in found if a > 0]
        if not found:
            raise InputError(good[0], "no pixel size in the micrograph headers: pass --pixel-size (Å)")
        pixel_size = Counter(found).most_common(1)[0][0]
    blocks = [da.from_delayed(dask.delayed(_read_or_nan, pure=True)(str(p), ref_shape),
                              shape=(1,) + ref_shape, dtype=np.float32) for p in good]
    images = da.concatenate(blocks, axis=0)
    attrs = {**microscope_attrs(pixel_size, voltage, cs, amplitude_contrast),
             **provenance("ingest", {"n_files": len(paths)}, ",".join(str(p) for p in paths[:3])
                          + (" ..." if len(paths) > 3 else ""))}
    ds = micrograph_dataset(images, [p.stem for p in good], attrs)
    ds["path"] = ("micrograph", np.array([str(p) for p in good], dtype=object))
    # files whose pixels fail the checks are written as NaN markers; their flag is computed from
    # the same read as the pixels (not by reading every stored micrograph back afterwards)
    ds["valid"] = (("micrograph",), da.map_blocks(_first_pixel_finite, images, drop_axis=(1, 2), dtype=bool))
    write_group(ds, store, "micrographs", resume=resume, label="ingest micrographs")
    stored = open_group(store, "micrographs")
    valid = np.asarray(stored["valid"].values, bool)
    for i in np.flatnonzero(~valid):
        try:
            read_micrograph(good[i], expected_shape=ref_shape)
            reason = f"{good[i]}: unreadable"
        except InputError as e:
            reason = str(e)
        bad.append({"file": str(good[i]), "reason": reason})
        log.warning("skipping %s", reason)
    return stored.isel(micrograph=np.flatnonzero(valid)), bad
