"""RELION STAR files ↔ ``xarray.Dataset`` particle tables (parsing via ``starfile``).

Data model (what :func:`read_particles` returns)
- dims ``particle`` (one per row of the particles/micrographs/coordinates loop) and ``optics``
  (one per optics group; absent when the file has no optics table).
- Every particle-loop column is a variable named by its RELION label without the underscore
  (``rlnCoordinateX``, ``rlnImageName`` …) along ``particle``; every optics-loop column is a
  variable along ``optics``. The optics loop's ``rlnOpticsGroup`` column is the ``optics``
  dimension coordinate (so ``ds.rlnVoltage.sel(optics=ds.rlnOpticsGroup)`` is per particle; see
  :func:`per_particle`); any other label present in both loops is stored as ``optics_<label>``.
- Values: floats float64, integers int64, strings numpy object arrays of ``str``.
- attrs: ``star_particle_columns`` / ``star_optics_columns`` (column order of each loop, STAR
  labels), ``star_block`` (particles block name: ``particles``, ``micrographs``, ``''``,
  ``images``…), ``source`` (path of the STAR file), ``star_version`` (e.g. 30001, 50001 or
  ``'pre-3.1'``), ``origin_units`` (``'A'``, or ``'px'`` when pixel origins could not be converted).

Units follow RELION: coordinates in micrograph pixels, origins in Å (``rlnOriginXAngst``),
angles in degrees, defocus in Å, voltage in kV, Cs in mm, pixel sizes in Å.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import xarray as xr

from ..errors import InputError
from .mrc import read_stack

OPTICS_GROUP = "rlnOpticsGroup"
LEGACY_OPTICS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
_PARTICLE_BLOCKS = ("particles", "micrographs", "movies", "", "images")
# RELION labels that hold real numbers: kept float64 even when a file writes them as "0" or "300".
FLOAT_LABELS = frozenset(
    "rln" + k for k in (
        "CoordinateX CoordinateY CoordinateZ OriginX OriginY OriginZ OriginXAngst OriginYAngst "
        "OriginZAngst AngleRot AngleTilt AnglePsi AngleTiltPrior AnglePsiPrior AngleRotPrior "
        "DefocusU DefocusV DefocusAngle CtfBfactor CtfScalefactor PhaseShift CtfMaxResolution "
        "CtfFigureOfMerit Voltage SphericalAberration AmplitudeContrast ImagePixelSize "
        "MicrographPixelSize MicrographOriginalPixelSize DetectorPixelSize Magnification "
        "NormCorrection AutopickFigureOfMerit BeamTiltX BeamTiltY LogLikeliContribution "
        "MaxValueProbDistribution"
    ).split()
)
_RESERVED = ("data_", "loop_", "save_", "global_", "stop_", "_", "#", '"', "'", ";")


# ----------------------------------------------------------------------------------- reading
def read_star_blocks(path: str | Path) -> dict[str, pd.DataFrame]:
    """All data blocks of a STAR file as DataFrames (key-value blocks become one-row frames).

    Keys are block names without ``data_`` (``''`` for a bare ``data_``). Raises InputError
    naming the file when it is missing or cannot be parsed.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        raw = starfile.read(path, always_dict=True)
    except Exception as err:
        raise InputError(path, f"cannot parse STAR file ({type(err).__name__}: {err})") from None
    blocks = {}
    for name, block in raw.items():
        if isinstance(block, dict):
            block = pd.DataFrame({k: [v] for k, v in block.items()})
        if isinstance(block, pd.DataFrame):
            blocks[name] = block
    # pandas pads short rows with NaN: reject that unless the file really holds 'nan' values
    if any(b.isna().to_numpy().any() for b in blocks.values()):
        if not re.search(r"(?<![\w.])[+-]?nan(?![\w.])", path.read_text(errors="replace"), re.IGNORECASE):
            raise InputError(path, "a data row has fewer values than the loop has columns")
    if not blocks:
        raise InputError(path, "not a STAR file (no data_ block with a loop_ or key-value pairs)")
    return blocks


def _star_version(path: Path, has_optics: bool):
    with open(path, "r", errors="replace") as f:
        for _, line in zip(range(200), f):
            m = re.match(r"#\s*version\s+(\d+)", line.strip())
            if m:
                return int(m.group(1))
    return 30001 if has_optics else "pre-3.1"


def _column(series: pd.Series, label: str = "") -> np.ndarray:
    """One STAR column as int64, float64 or an object array of str."""
    dt = series.dtype
    if label in FLOAT_LABELS and pd.api.types.is_numeric_dtype(dt):
        return series.to_numpy(dtype=np.float64)
    if pd.api.types.is_bool_dtype(dt):
        return series.to_numpy(dtype=np.int64)
    if pd.api.types.is_integer_dtype(dt):
        return series.to_numpy(dtype=np.int64)
    if pd.api.types.is_float_dtype(dt):
        return series.to_numpy(dtype=np.float64)
    return np.array([str(v) for v in series], dtype=object)


def _legacy_pixel_size(df: pd.DataFrame, pixel_size):
    """Per-particle pixel size (Å) of a pre-3.1 table and the columns it came from."""
    n = len(df)
    if "rlnImagePixelSize" in df:
        return df["rlnImagePixelSize"].to_numpy(np.float64), ["rlnImagePixelSize"]
    if "rlnDetectorPixelSize" in df and "rlnMagnification" in df:
        px = df["rlnDetectorPixelSize"].to_numpy(np.float64) * 1e4 / df["rlnMagnification"].to_numpy(np.float64)
        return px, ["rlnDetectorPixelSize", "rlnMagnification"]
    if pixel_size is not None:
        return np.full(n, float(pixel_size)), []
    return None, []


def _build_legacy_optics(df: pd.DataFrame, pixel):
    """Pre-3.1: group particles by (voltage, Cs, amplitude contrast, pixel size) into optics groups.

    Returns (particle table without the moved columns + rlnOpticsGroup, optics table), or
    (df, None) when the file has no microscope columns (e.g. a coordinate file).
    """
    px, px_cols = pixel
    moved = [c for c in df.columns if c in LEGACY_OPTICS]
    if not moved and not px_cols:
        return df, None
    keys = pd.DataFrame({c: df[c].to_numpy(np.float64) for c in moved})
    if px is not None:
        keys["rlnImagePixelSize"] = px
    group = keys.groupby(list(keys.columns), sort=False, dropna=False).ngroup().to_numpy(np.int64) + 1
    first = np.unique(group, return_index=True)[1]
    optics = keys.iloc[first].reset_index(drop=True)
    ids = np.arange(1, len(optics) + 1, dtype=np.int64)
    optics.insert(0, "rlnOpticsGroupName", [f"opticsGroup{i}" for i in ids])
    optics.insert(0, OPTICS_GROUP, ids)
    particles = df.drop(columns=moved + px_cols)
    particles[OPTICS_GROUP] = group
    return particles, optics


def _origins_to_angstrom(df: pd.DataFrame, px) -> tuple[pd.DataFrame, str]:
    """Rename rlnOriginX/Y/Z (px) to rlnOriginX/Y/ZAngst (Å) in place of the old columns."""
    legacy = [a for a in "XYZ" if f"rlnOrigin{a}" in df and f"rlnOrigin{a}Angst" not in df]
    if not legacy:
        return df, "A"
    if px is None or not np.all(np.isfinite(px)):
        return df, "px"
    df = df.copy()
    for a in legacy:
        df[f"rlnOrigin{a}"] = df[f"rlnOrigin{a}"].to_numpy(np.float64) * px
    return df.rename(columns={f"rlnOrigin{a}": f"rlnOrigin{a}Angst" for a in legacy}), "A"


def _optics_name(label: str, particle_labels) -> str:
    if label == OPTICS_GROUP:
        return "optics"
    return f"optics_{label}" if label in particle_labels else label


def _optics_label(name: str) -> str:
    if name == "optics":
        return OPTICS_GROUP
    return name[len("optics_"):] if name.startswith("optics_") else name


def read_particles(path: str | Path, *, pixel_size: float | None = None) -> xr.Dataset:
    """Read a RELION particle, micrograph or coordinate STAR file (3.0 … 5.0) as a Dataset.

    ``pixel_size`` (Å) is used only for pre-3.1 files that carry neither rlnImagePixelSize nor
    rlnDetectorPixelSize/rlnMagnification: it sets the optics groups' pixel size and converts
    pixel origins (rlnOriginX/Y) to Å. See the module docstring for the data model.
    """
    path = Path(path)
    blocks = read_star_blocks(path)
    loops = {k: v for k, v in blocks.items() if k != "optics"}
    if not loops:
        raise InputError(path, "no particle table (only an optics block)")
    block = next((b for b in _PARTICLE_BLOCKS if b in loops), next(iter(loops)))
    df = loops[block]
    optics = blocks.get("optics")
    try:
        if optics is None:  # pre-3.1 or a coordinate file
            pixel = _legacy_pixel_size(df, pixel_size)
            df, optics = _build_legacy_optics(df, pixel)
            px = pixel[0]
        elif OPTICS_GROUP in df and OPTICS_GROUP in optics and "rlnImagePixelSize" in optics:
            lookup = dict(zip(optics[OPTICS_GROUP].to_numpy(), optics["rlnImagePixelSize"].to_numpy(np.float64)))
            px = np.array([lookup.get(g, np.nan) for g in df[OPTICS_GROUP].to_numpy()], dtype=np.float64)
        else:
            px = None if pixel_size is None else np.full(len(df), float(pixel_size))
        df, origin_units = _origins_to_angstrom(df, px)
    except (ValueError, TypeError) as err:
        raise InputError(path, f"non-numeric value in a pixel-size, microscope or origin column ({err})") from None

    return tables_to_dataset(df, optics, {
        "star_block": block,
        "source": str(path),
        "star_version": _star_version(path, optics is not None and "optics" in blocks),
        "origin_units": origin_units,
    })


def tables_to_dataset(particles: pd.DataFrame, optics: pd.DataFrame | None = None,
                      attrs: dict | None = None) -> xr.Dataset:
    """Particle (and optics) tables → the particle Dataset of the data model.

    Particle columns become variables along ``particle``; optics columns variables along
    ``optics`` (the optics ``rlnOpticsGroup`` is the ``optics`` coordinate; any other label in
    both tables is stored as ``optics_<label>``). Column orders go to the attributes.
    """
    pcols = list(particles.columns)
    data_vars = {c: ("particle", _column(particles[c], c)) for c in pcols}
    coords, ocols = {}, []
    if optics is not None:
        ocols = list(optics.columns)
        for c in ocols:
            name = _optics_name(c, pcols)
            (coords if name == "optics" else data_vars)[name] = ("optics", _column(optics[c], c))
    out = {"star_particle_columns": pcols, "star_optics_columns": ocols, "star_block": "particles"}
    out.update(attrs or {})
    return xr.Dataset(data_vars, coords=coords, attrs=out)


def per_particle(ds: xr.Dataset, label: str) -> np.ndarray:
    """Values of ``label`` for every particle, looked up in the optics table when needed.

    E.g. ``per_particle(ds, "rlnImagePixelSize")`` (Å) or ``per_particle(ds, "rlnVoltage")`` (kV)
    works for 3.1+ files and for converted pre-3.1 files alike. Raises KeyError if absent.
    """
    if label in ds.data_vars and ds[label].dims == ("particle",):
        return ds[label].values
    name = _optics_name(label, [v for v in ds.data_vars if ds[v].dims == ("particle",)])
    if name not in ds.variables or OPTICS_GROUP not in ds or "optics" not in ds.coords:
        raise KeyError(label)
    pos = pd.Index(ds["optics"].values).get_indexer(ds[OPTICS_GROUP].values)
    if (pos < 0).any():
        raise KeyError(f"{label}: particles refer to optics groups missing from the optics table")
    return ds[name].values[pos]


def require_columns(ds: xr.Dataset, cols, path=None) -> None:
    """Raise InputError ``"<file>: missing required column(s) rlnX, rlnY"`` if any are absent."""
    have = set(ds.variables) | {_optics_label(v) for v in ds.variables}
    missing = [c for c in cols if c not in have]
    if missing:
        raise InputError(path if path is not None else ds.attrs.get("source"),
                         f"missing required column(s) {', '.join(missing)}")


# ----------------------------------------------------------------------------------- writing
def _format(values) -> list[str]:
    """STAR text of one column; floats use the shortest repr that round-trips exactly."""
    values = np.asarray(values)
    kind = values.dtype.kind
    if kind == "f":
        return [repr(float(v)) for v in values]
    if kind in "iub":
        return [str(int(v)) for v in values]
    text = [str(v) for v in values]
    return [f'"{s}"' if len(s.split()) != 1 or s.startswith(_RESERVED) else s for s in text]


def _loop_text(name: str, columns: list[tuple[str, np.ndarray]]) -> str:
    lines = ["", "# version 30001", "", f"data_{name}", "", "loop_ "]
    lines += [f"_{label} #{i} " for i, (label, _) in enumerate(columns, 1)]
    cols = []
    for _, values in columns:
        text = _format(values)
        width = max((len(s) for s in text), default=0)
        cols.append([s.rjust(width) for s in text])
    lines += [" ".join(row) + " " for row in zip(*cols)]
    return "\n".join(lines) + "\n \n"


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _ordered(names: list[str], known: list[str]) -> list[str]:
    """Original column order first, new names appended, duplicates dropped."""
    return list(dict.fromkeys([k for k in known if k in names] + names))


def write_particles(path: str | Path, ds: xr.Dataset, *, block: str = "particles") -> None:
    """Write a particle Dataset as a RELION 3.1 STAR file (``# version 30001``), atomically.

    Writes ``data_optics`` then ``data_<block>``, or only ``data_<block>`` when the Dataset
    has no optics variables. Original column order is kept; variables added since reading
    are appended. Only 1-D variables along ``particle``/``optics`` are written.
    """
    path = Path(path)
    pvars = [v for v in ds.variables if ds[v].dims == ("particle",) and v != "particle"]
    ovars = {_optics_label(v): v for v in ds.variables if ds[v].dims == ("optics",)}
    plabels = _ordered(pvars, list(ds.attrs.get("star_particle_columns", [])))
    olabels = _ordered(list(ovars), list(ds.attrs.get("star_optics_columns", [])) or [OPTICS_GROUP])
    text = ""
    if olabels:
        text += _loop_text("optics", [(c, ds[ovars[c]].values) for c in olabels])
    text += _loop_text(block, [(c, ds[c].values) for c in plabels])
    _write_text_atomic(path, text)


def write_coordinates(path: str | Path, x, y, *, extra: dict | None = None) -> None:
    """Write a RELION coordinate STAR (single ``data_`` block) for one micrograph.

    ``x``, ``y``: particle centres in micrograph pixels (x = column, y = row, 0-based as
    stored). ``extra``: more columns, e.g. ``{"rlnAutopickFigureOfMerit": scores}``.
    """
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    cols = [("rlnCoordinateX", x), ("rlnCoordinateY", y)]
    for label, values in (extra or {}).items():
        values = np.asarray(values).ravel()
        if values.shape != x.shape:
            raise ValueError(f"column {label} has {values.size} values for {x.size} coordinates")
        cols.append((label.lstrip("_"), values))
    _write_text_atomic(Path(path), _loop_text("", cols))


# ----------------------------------------------------------------------------------- images
def format_image_name(index0: int, stack_path: str | Path) -> str:
    """RELION image name for 0-based image ``index0`` of a stack: ``"000001@stack.mrcs"``."""
    return f"{int(index0) + 1:06d}@{stack_path}"


def _image_names(ds: xr.Dataset, sel) -> list[tuple[Path, int]]:
    star = ds.attrs.get("source")
    require_columns(ds, ["rlnImageName"], star)
    folder = Path(star).parent if star else Path(".")
    names = ds["rlnImageName"].values
    names = names if sel is None else names[np.asarray(sel, dtype=np.int64)]
    resolved: dict[str, Path] = {}
    out = []
    for name in names:
        num, at, rel = str(name).partition("@")
        if not at:
            num, rel = "1", num
        try:
            index0 = int(num) - 1
        except ValueError:
            raise InputError(star, f"bad rlnImageName '{name}' (expected NNNNNN@stack.mrcs)") from None
        stack = resolved.get(rel)
        if stack is None:
            p = Path(rel)
            candidates = [p] if p.is_absolute() else [folder / p, p]
            candidates.append(folder / p.name)
            stack = next((c for c in candidates if c.is_file()), None)
            if stack is None:
                raise InputError(star, f"image stack '{rel}' not found (looked for "
                                       f"{', '.join(str(c) for c in dict.fromkeys(candidates))})")
            resolved[rel] = stack
        out.append((stack, index0))
    return out


def image_names(ds: xr.Dataset) -> list[tuple[Path, int]]:
    """(stack file, 0-based index) of every particle's ``rlnImageName``.

    Stack paths are resolved relative to the STAR file's folder (``ds.attrs['source']``),
    then the current folder (RELION project layout), then as the bare file name in the STAR
    file's folder. A stack found nowhere raises InputError naming the STAR and the stack.
    """
    return _image_names(ds, None)


def read_particle_images(ds: xr.Dataset, indices=None) -> np.ndarray:
    """Particle images as float32 (n, y, x), for all particles or the 0-based ``indices``.

    Reads are grouped per stack file and memory-mapped, so only the requested images are read.
    """
    names = _image_names(ds, indices)
    groups: dict[Path, list[int]] = {}
    for k, (stack, _) in enumerate(names):
        groups.setdefault(stack, []).append(k)
    out = None
    for stack, rows in groups.items():
        imgs = read_stack(stack, [names[k][1] for k in rows])
        if out is None:
            out = np.empty((len(names),) + imgs.shape[1:], np.float32)
        elif imgs.shape[1:] != out.shape[1:]:
            raise InputError(stack, f"images are {imgs.shape[1]}×{imgs.shape[2]}, other stacks of "
                                    f"{ds.attrs.get('source')} are {out.shape[1]}×{out.shape[2]}")
        out[rows] = imgs
    return out if out is not None else np.zeros((0, 0, 0), np.float32)
