"""The data model: micrographs, particle stacks, maps and particle tables as xarray objects
in a zarr store.

* Micrographs: ``Dataset`` with ``image`` ``(micrograph, y, x)`` float32, one micrograph per
  chunk, coordinate ``micrograph`` (names), and ``valid`` ``(micrograph,)`` bool.
* Particle stacks: ``Dataset`` with ``image`` (and other per-image arrays) ``(particle, y, x)``
  float32 in chunks of ~1–4k particles, and the per-particle table as 1-D variables along
  ``particle`` named by RELION labels (``rlnCoordinateX``, ``rlnAngleRot``, …; cryodask's own
  columns start with ``cd``). Optics-group columns live along ``optics``.
* Maps: ``DataArray`` ``(z, y, x)`` float32.

Every object carries attributes: ``pixel_size`` (Å), ``voltage`` (kV), ``cs`` (mm),
``amplitude_contrast``, and provenance (``source``, ``stage``, ``parameters`` as JSON,
``cryodask_version``).

A *stage* is a function ``Dataset -> Dataset`` that only builds a lazy Dask graph; computing
happens when :func:`write_group` writes the result to the store.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from . import __version__

log = logging.getLogger("cryodask")

__all__ = [
    "MICROSCOPE_KEYS",
    "microscope_attrs",
    "provenance",
    "micrograph_dataset",
    "particle_dataset",
    "table_to_frame",
    "write_group",
    "open_group",
    "PARTICLE_CHUNK",
    "particle_chunk",
]

#: most particles per chunk of a particle stack (15 MB of float32 at a 60 px box). Chunks of 2048
#: left 7 chunks for 12,500 particles (uneven work for 2 workers) and raised the extraction's
#: steady memory per worker: benchmarks/bench_memory.py 50 → 500 micrographs 1.30× with 2048,
#: 1.21× with 1024. :func:`particle_chunk` picks the size actually used.
PARTICLE_CHUNK = 1024


def particle_chunk(n: int, max_chunk: int = PARTICLE_CHUNK) -> int:
    """Particles per chunk for a stack of ``n``: equal chunks of at most ``max_chunk``, as many
    as the fewest such chunks rounded up to 1, 2, 4, 8 or a multiple of 8.

    Each per-chunk task of the particle stages (masks, alignment rounds, writes) ends at a
    barrier; with a chunk count that divides evenly over 1, 2, 4 or 8 workers, no worker waits
    there for another's extra chunk. 12,546 particles: 16 chunks of 785 (not 12 of 1024 and one
    of 258, on which one of 2 workers worked alone at every barrier)."""
    n, max_chunk = int(n), max(1, int(max_chunk))
    k = max(1, -(-n // max_chunk))
    k = 1 << (k - 1).bit_length() if k <= 8 else 8 * -(-k // 8)
    return max(1, -(-n // k))

MICROSCOPE_KEYS = ("pixel_size", "voltage", "cs", "amplitude_contrast")

# optics-table labels and the attribute each one maps to
_OPTICS_LABELS = {
    "rlnImagePixelSize": "pixel_size",
    "rlnVoltage": "voltage",
    "rlnSphericalAberration": "cs",
    "rlnAmplitudeContrast": "amplitude_contrast",
}


def microscope_attrs(pixel_size: float, voltage: float = 300.0, cs: float = 2.7,
                     amplitude_contrast: float = 0.1) -> dict[str, float]:
    """Attributes every image object carries: Å/px, kV, mm, fraction."""
    if not pixel_size or pixel_size <= 0:
        raise ValueError("pixel size must be positive (Å/px)")
    return {"pixel_size": float(pixel_size), "voltage": float(voltage), "cs": float(cs),
            "amplitude_contrast": float(amplitude_contrast), "units": "Å"}


def provenance(stage: str, parameters: dict[str, Any] | None = None, source: str | None = None) -> dict[str, str]:
    """Provenance attributes: stage name, parameters (JSON), source, cryodask version."""
    return {
        "stage": stage,
        "parameters": json.dumps(parameters or {}, sort_keys=True, default=str),
        "source": str(source or ""),
        "cryodask_version": __version__,
    }


def micrograph_dataset(images: da.Array, names, attrs: dict[str, Any], valid=None) -> xr.Dataset:
    """Wrap a lazy ``(micrograph, y, x)`` stack (one micrograph per chunk) as a Dataset."""
    if images.ndim != 3:
        raise ValueError("micrographs must be (micrograph, y, x)")
    images = images.astype(np.float32).rechunk((1, -1, -1))
    n = images.shape[0]
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    return xr.Dataset(
        {"image": (("micrograph", "y", "x"), images), "valid": (("micrograph",), valid)},
        coords={"micrograph": np.asarray([str(s) for s in names], dtype=object)},
        attrs=dict(attrs),
    )


def particle_dataset(images: da.Array | np.ndarray | None, table: pd.DataFrame, attrs: dict[str, Any],
                     optics: pd.DataFrame | None = None, chunk: int | None = None) -> xr.Dataset:
    """A particle stack with its per-particle table.

    ``images`` (n, N, N) (or None for a table only); ``table`` has one row per particle, columns
    named by RELION labels. ``optics`` (one row per optics group) defaults to one group built
    from the microscope attributes.
    """
    from .io.star import tables_to_dataset

    n = len(table)
    chunk = int(chunk or particle_chunk(n))
    table = table.reset_index(drop=True)
    if optics is None and "pixel_size" in attrs:
        optics = pd.DataFrame({
            "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
            **{lab: [attrs[key]] for lab, key in _OPTICS_LABELS.items() if key in attrs},
            **({"rlnImageSize": [int(images.shape[-1])], "rlnImageDimensionality": [2]} if images is not None else {}),
        })
        if "rlnOpticsGroup" not in table.columns:
            table = table.assign(rlnOpticsGroup=np.ones(n, np.int64))
    ds = tables_to_dataset(table, optics, dict(attrs))
    if images is not None:
        arr = images if isinstance(images, da.Array) else da.from_array(np.asarray(images, np.float32), chunks=(chunk, -1, -1))
        if arr.shape[0] != n:
            raise ValueError(f"{arr.shape[0]} images but {n} table rows")
        ds["image"] = (("particle", "y", "x"), arr.astype(np.float32).rechunk((chunk, -1, -1)))
    return ds


def table_to_frame(ds: xr.Dataset, dim: str = "particle") -> pd.DataFrame:
    """The 1-D variables along ``dim`` as a DataFrame (computes them if lazy)."""
    cols = [v for v in ds.data_vars if ds[v].dims == (dim,)]
    out = {}
    for c in cols:
        v = np.asarray(ds[c].values)
        out[c] = v.astype(object) if v.dtype.kind in "UT" else v
    return pd.DataFrame(out)


def _encode_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in attrs.items():
        if isinstance(v, (np.floating, np.integer)):
            v = v.item()
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, Path):
            v = str(v)
        out[k] = v
    return out


def _prepare(ds: xr.Dataset) -> tuple[xr.Dataset, dict]:
    import zarr

    ds = ds.copy()
    ds.attrs = _encode_attrs(ds.attrs)
    encoding = {}
    for name, var in ds.variables.items():
        if var.dtype.kind in "UT":  # fixed-width / numpy StringDType -> variable-length UTF-8
            ds[name] = var.astype(object) if name not in ds.coords else var.astype(object)
            continue
        if var.dtype.kind == "O":
            continue
        if var.ndim >= 2:
            encoding[name] = {"compressors": (zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),)}
    return ds, encoding


def write_group(ds: xr.Dataset, store: str | Path, group: str, *, compute: bool = True, mode: str = "w",
                resume: str | Path | None = None, label: str = ""):
    """Write a Dataset to ``store/group`` (zarr v3, Blosc-zstd); this is where graphs compute.

    String variables are stored as variable-length UTF-8 (they read back as numpy
    ``StringDType``). Returns the dask delayed write when ``compute=False``.

    With ``resume`` (a folder for completion records), the lazy arrays are committed chunk by
    chunk along their first dimension, each chunk leaving a record when its data are on disk;
    a re-run with the same graph (same Dask token) writes only the chunks without a record, so
    a job killed part-way redoes only the missing work.
    """
    ds, encoding = _prepare(ds)
    if resume is None:
        return ds.to_zarr(str(store), group=group, mode=mode, consolidated=False, encoding=encoding,
                          compute=compute, zarr_format=3)
    return _write_resumable(ds, encoding, Path(store), group, Path(resume), label)


def _write_block(block: np.ndarray, store: str, path: str, start: int, marker: str) -> int:
    import zarr

    from .runtime import release_freed_memory

    release_freed_memory()  # the chunks written before this one are freed: hand their pages back
    arr = zarr.open_array(store=store, path=path, mode="r+")
    arr[start:start + block.shape[0]] = block
    Path(marker).touch()
    return int(block.shape[0])


def _write_resumable(ds: xr.Dataset, encoding: dict, store: Path, group: str, records: Path, label: str):
    import dask
    import zarr

    from .runtime import compute as run_compute

    lazy = [n for n, v in ds.data_vars.items() if isinstance(v.data, da.Array)]
    key = dask.base.tokenize(*[ds[n].data for n in lazy], sorted(ds.attrs.items()))
    rec_dir = records / f"{group}.chunks"
    meta_ok = False
    try:
        meta_ok = zarr.open_group(str(store), path=group, mode="r").attrs.get("cd_resume_key") == key
    except Exception:  # noqa: BLE001 - no such group yet
        pass
    if not meta_ok:  # a new graph: fresh arrays and no completion records
        import shutil

        shutil.rmtree(rec_dir, ignore_errors=True)
        ds.attrs["cd_resume_key"] = key
        ds.attrs["cd_resume_vars"] = list(lazy)
        ds.to_zarr(str(store), group=group, mode="w", consolidated=False, encoding=encoding, compute=False,
                   zarr_format=3)
    rec_dir.mkdir(parents=True, exist_ok=True)
    tasks = []
    for name in lazy:
        arr = ds[name].data
        blocks = arr.to_delayed().reshape(arr.numblocks[0], -1)[:, 0] if arr.ndim > 1 else arr.to_delayed()
        starts = np.concatenate([[0], np.cumsum(arr.chunks[0])[:-1]])
        for i, (blk, start) in enumerate(zip(blocks, starts)):
            marker = rec_dir / f"{name}.{i}"
            if marker.exists():
                continue
            tasks.append(dask.delayed(_write_block)(blk, str(store), f"{group}/{name}", int(start), str(marker)))
    n_total = sum(ds[n].data.numblocks[0] for n in lazy)
    what = label or f"write {group}"
    if not meta_ok:
        log.info("%s: writing %d chunk(s) of %s (new graph %s)", what, n_total, group, key[:12])
    elif tasks:
        log.info("%s: resuming: %d of %d chunk(s) of %s already committed, writing the other %d",
                 what, n_total - len(tasks), n_total, group, len(tasks))
    else:
        log.info("%s: all %d chunk(s) of %s already committed, nothing to compute", what, n_total, group)
    if tasks:
        run_compute(*tasks, label=what)
    return {"chunks_total": n_total, "chunks_written": len(tasks), "resumed": bool(meta_ok)}


def open_group(store: str | Path, group: str) -> xr.Dataset:
    """Open ``store/group`` lazily (dask arrays, chunks as written).

    A group written by :func:`write_group` with ``resume`` carries the key of the graph that
    produced it (``cd_resume_key``); its Dask arrays are then named from that key, the store
    path and the variable, so graphs built on it get the same names in every process. (xarray's
    default names include the store folder's modification time, which changes whenever another
    group is added, and a re-run after a kill would not recognise its own committed chunks.)
    """
    from dask.base import tokenize

    ds = xr.open_zarr(str(store), group=group, consolidated=False, chunks=None)
    key = ds.attrs.get("cd_resume_key")
    if key is None:
        return xr.open_zarr(str(store), group=group, consolidated=False, chunks={})
    base = tokenize(str(Path(store).absolute()), group, key)
    committed = set(ds.attrs.get("cd_resume_vars", []))
    out = ds.copy()
    for name, var in ds.variables.items():
        if name in ds.indexes or var.ndim == 0:
            continue
        # the arrays committed chunk by chunk are named by the graph that wrote them; the others
        # (small tables, flags such as ``valid`` that may be updated in place) by their content
        tok = base if name in committed or var.ndim >= 2 else tokenize(base, np.asarray(var.values))
        pref = var.encoding.get("preferred_chunks") or dict(zip(var.dims, var.shape))
        out[name] = ds[[name]].chunk(pref, name_prefix=f"{group}-", token=tok)[name].variable
    return out
