"""Particle extraction: boxes around picked coordinates, from the original and the
preprocessed micrographs, into a chunked particle stack.

Kernels: :func:`box_size` (from the particle diameter), :func:`extract_boxes` (one micrograph),
:func:`normalise_boxes` (RELION's convention: background outside a circle has mean 0 and
standard deviation 1). Graph builder: :func:`extract_graph` — one task per micrograph, then the
particles are rechunked into equal blocks (:func:`cryodask.model.particle_chunk`) for the
later stages.

Coordinates follow RELION: ``x`` = column, ``y`` = row, in pixels of the original micrograph;
a particle's box is centred on the integer pixel nearest the coordinate.
"""
from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from .model import particle_chunk, particle_dataset, provenance

__all__ = ["box_size", "edge_mask", "extract_boxes", "normalise_boxes", "resize_boxes", "extract_graph",
           "extract_with_preprocessed"]


def box_size(diameter_px: float, factor: float = 1.5, multiple: int = 2) -> int:
    """Even box size (px) of about ``factor`` × the particle diameter, rounded up."""
    b = int(np.ceil(diameter_px * factor / multiple) * multiple)
    return max(b, 2 * multiple)


def edge_mask(coords: np.ndarray, shape: tuple[int, int], box: int) -> np.ndarray:
    """True for coordinates (k, 2) = (x, y) whose whole box lies inside the micrograph."""
    c = np.rint(np.asarray(coords, float)).astype(int).reshape(-1, 2)
    h = box // 2
    ny, nx = shape
    return (c[:, 0] - h >= 0) & (c[:, 1] - h >= 0) & (c[:, 0] - h + box <= nx) & (c[:, 1] - h + box <= ny)


def extract_boxes(micrograph: np.ndarray, coords: np.ndarray, box: int, *, pad: bool = False) -> np.ndarray:
    """Cut ``box``×``box`` images centred on ``coords`` (k, 2) = (x, y) px.

    Boxes that cross the micrograph edge are padded with the micrograph mean when ``pad`` is
    true (otherwise the caller must have removed them, see :func:`edge_mask`).
    Returns float32 (k, box, box).
    """
    img = np.asarray(micrograph, np.float32)
    c = np.rint(np.asarray(coords, float)).astype(int).reshape(-1, 2)
    h = box // 2
    if pad:
        img = np.pad(img, box, mode="constant", constant_values=float(img.mean()))
        c = c + box
    out = np.empty((len(c), box, box), np.float32)
    for i, (x, y) in enumerate(c):
        out[i] = img[y - h:y - h + box, x - h:x - h + box]
    return out


def _background(box: int, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:box, 0:box] - box // 2
    return (xx**2 + yy**2) > radius**2


def normalise_boxes(boxes: np.ndarray, bg_radius: float | None = None, invert: bool = False) -> np.ndarray:
    """RELION-style normalisation: pixels outside ``bg_radius`` (px; default 75 % of half the
    box) get mean 0 and standard deviation 1; ``invert`` flips the contrast (dark protein →
    white, as RELION's ``--invert_contrast``). Input/output (k, box, box) float32."""
    b = np.asarray(boxes, np.float32)
    box = b.shape[-1]
    bg = _background(box, 0.75 * box / 2 if bg_radius is None else bg_radius)
    vals = b[:, bg]
    mean = vals.mean(axis=1)[:, None, None]
    std = vals.std(axis=1)[:, None, None]
    out = (b - mean) / np.where(std > 0, std, 1.0)
    return (-out if invert else out).astype(np.float32)


def _extract_block(block: np.ndarray, coords: np.ndarray, box: int, invert: bool, pad: bool) -> np.ndarray:
    return normalise_boxes(extract_boxes(block[0], coords, box, pad=pad), invert=invert)


def extract_graph(micrographs: xr.Dataset, picks: pd.DataFrame, box: int, *, invert: bool = True,
                  edge: str = "drop", variables=("image",), names=None, chunk: int | None = None,
                  ) -> tuple[xr.Dataset, pd.DataFrame]:
    """Lazy particle stack(s) from picks.

    Parameters
    ----------
    micrographs : Dataset with ``(micrograph, y, x)`` variables (chunked one per micrograph).
    picks : rows with ``rlnMicrographName`` (matching ``micrographs.micrograph``),
        ``rlnCoordinateX/Y`` (px) and any other columns (kept).
    box : box size, px.
    invert : flip contrast so that protein is white (micrographs have dark protein).
    edge : 'drop' particles whose box leaves the micrograph, or 'pad' them with the mean.
    variables : which micrograph variables to cut from (e.g. ``("image", "preprocessed")``);
        the output variables are called ``names`` (default: the same names).
    chunk : particles per chunk of the stack (default :func:`cryodask.model.particle_chunk` of
        the number kept).

    Returns
    -------
    (dataset, dropped): the particle Dataset (lazy images + table along ``particle``) and the
    table of dropped edge particles (with a ``reason`` column).
    """
    names = list(names or variables)
    shape = micrographs[variables[0]].shape[1:]
    mic_names = [str(m) for m in micrographs["micrograph"].values]
    index = {m: i for i, m in enumerate(mic_names)}
    picks = picks.reset_index(drop=True)
    mic_col = picks["rlnMicrographName"].astype(str)
    lookup = {m: index.get(m, index.get(_stem(m), -1)) for m in mic_col.unique()}  # per micrograph, not per pick
    key = mic_col.map(lookup)
    unknown = picks[key < 0]
    coords = picks[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float)
    inside = edge_mask(coords, shape, box) if edge == "drop" else np.ones(len(picks), bool)
    keep = (key >= 0).to_numpy() & inside
    dropped = picks[~keep].copy()
    dropped["reason"] = np.where((key[~keep] < 0).to_numpy(), "micrograph not found", "box crosses the micrograph edge")
    kept = picks[keep].copy()
    kept["_mic"] = key[keep].to_numpy()
    kept = kept.sort_values(["_mic"], kind="stable").reset_index(drop=True)
    chunk = int(chunk or particle_chunk(len(kept)))
    data = {}
    for var, out_name in zip(variables, names):
        blocks = micrographs[var].data.to_delayed().ravel()
        parts = []
        for mi, grp in kept.groupby("_mic", sort=True):
            c = grp[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float)
            task = dask.delayed(_extract_block, pure=True)(blocks[mi], c, box, invert, edge == "pad")
            parts.append(da.from_delayed(task, shape=(len(grp), box, box), dtype=np.float32))
        arr = da.concatenate(parts, axis=0) if parts else da.zeros((0, box, box), np.float32)
        data[out_name] = arr.rechunk((chunk, box, box))
    table = kept.drop(columns=["_mic"])
    attrs = {k: v for k, v in micrographs.attrs.items() if k in ("pixel_size", "voltage", "cs", "amplitude_contrast", "units")}
    attrs.update(provenance("extract", {"box": box, "invert": invert, "edge": edge}, "micrographs"))
    ds = particle_dataset(data.pop(names[0]), table, attrs, chunk=chunk)
    for n, arr in data.items():
        ds[n] = (("particle", "y", "x"), arr)
    if len(unknown):
        dropped.attrs["unknown_micrographs"] = sorted({str(s) for s in unknown["rlnMicrographName"]})
    return ds, dropped


def resize_boxes(boxes: np.ndarray, box: int) -> np.ndarray:
    """Resample (k, m, m) boxes to (k, ``box``, ``box``) (bilinear, torch), float32."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(boxes, np.float32))[:, None]
    if t.shape[0] == 0:
        return np.zeros((0, box, box), np.float32)
    return torch.nn.functional.interpolate(t, size=(box, box), mode="bilinear", align_corners=False)[:, 0].numpy()


def extract_with_preprocessed(micrographs: xr.Dataset, preprocessed: da.Array, binning: float, picks: pd.DataFrame,
                              box: int, *, invert: bool = True, edge: str = "drop",
                              chunk: int | None = None) -> tuple[xr.Dataset, pd.DataFrame]:
    """Every particle from the original *and* the preprocessed micrograph (the method keeps both).

    ``micrographs``: Dataset with ``image`` ``(micrograph, y, x)``; ``preprocessed``: dask array
    ``(micrograph, y', x')`` of the same micrographs downsampled by ``binning`` (one chunk per
    micrograph, e.g. :func:`cryodask.preprocess.preprocess_graph`); ``picks``: as
    :func:`extract_graph` (px of the original micrograph). The original boxes are
    :func:`extract_graph`'s; the preprocessed version of each kept particle is cut around the
    same centre at the picking scale (``u' = (u + 0.5)/s − 0.5`` with ``s`` = original/downsampled
    size, box ``box/binning`` rounded to even, padded at the edge), normalised the same way and
    resampled to ``box`` px, so both stacks share pixel size and centre.
    Returns ``(dataset with variables image and preprocessed, dropped edge particles)``.
    """
    ds, dropped = extract_graph(micrographs, picks, box, invert=invert, edge=edge, chunk=chunk)
    ny, nx = micrographs["image"].shape[1:]
    py, px = preprocessed.shape[1:]
    sx, sy = nx / px, ny / py
    kept = pd.DataFrame({"rlnMicrographName": ds["rlnMicrographName"].values.astype(object),
                         "rlnCoordinateX": (ds["rlnCoordinateX"].values + 0.5) / sx - 0.5,
                         "rlnCoordinateY": (ds["rlnCoordinateY"].values + 0.5) / sy - 0.5})
    pre_mics = xr.Dataset({"image": (("micrograph", "y", "x"), preprocessed)},
                          coords={"micrograph": micrographs["micrograph"].values})
    small = max(8, int(round(box / float(binning) / 2)) * 2)
    pre_ds, _ = extract_graph(pre_mics, kept, small, invert=invert, edge="pad", chunk=chunk)
    arr = pre_ds["image"].data
    ds["preprocessed"] = (("particle", "y", "x"), arr.map_blocks(resize_boxes, box, dtype=np.float32,
                                                                  chunks=(arr.chunks[0], (box,), (box,))))
    ds.attrs["box"] = int(box)
    ds.attrs["preprocessed_binning"] = float(binning)
    return ds, dropped


def _stem(name) -> str:
    from pathlib import Path

    return Path(str(name)).stem
