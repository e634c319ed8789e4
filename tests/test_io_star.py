"""RELION STAR reading/writing: exact round trips, legacy conversion, image lookup, errors."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import xarray as xr

from cryodask.errors import InputError
from cryodask.io import star
from cryodask.io.mrc import write_stack

ROOT = Path(__file__).resolve().parents[1] / ".."
DATA = ROOT / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data not present")


def _starlite():
    path = ROOT / "shared" / "checks" / "starlite.py"
    if not path.exists():
        pytest.skip("../shared/checks not present")
    spec = importlib.util.spec_from_file_location("starlite", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def assert_same(a: xr.Dataset, b: xr.Dataset):
    """Same columns, same order, every value exactly equal (no tolerance), same dtypes."""
    assert a.attrs["star_particle_columns"] == b.attrs["star_particle_columns"]
    assert a.attrs["star_optics_columns"] == b.attrs["star_optics_columns"]
    assert dict(a.sizes) == dict(b.sizes)
    assert sorted(a.variables) == sorted(b.variables)
    for v in a.variables:
        x, y = a[v].values, b[v].values
        assert x.dtype == y.dtype, v
        assert x.tolist() == y.tolist(), v  # exact equality, element by element


def _numeric(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def assert_text_matches(original: Path, written: Path):
    """Independent parser: every cell of the written file equals the original's, as numbers."""
    lite = _starlite()
    old, new = lite.read_star(original), lite.read_star(written)
    for block in ("optics", "particles"):
        if block not in old:
            continue
        assert list(new[block]) == list(old[block]), block
        for col, values in old[block].items():
            assert [_numeric(s) for s in new[block][col]] == [_numeric(s) for s in values], col


@needs_data
def test_relion31_round_trip_is_exact(tmp_path):
    src = DATA / "particles" / "relion31.star"
    ds = star.read_particles(src)
    assert ds.attrs["star_version"] == 30001 and ds.attrs["star_block"] == "particles"
    assert ds.sizes["particle"] == 5 and ds.sizes["optics"] == 1
    assert len(ds.attrs["star_particle_columns"]) == 26 and len(ds.attrs["star_optics_columns"]) == 9
    assert ds["rlnDefocusU"].dtype == np.float64 and ds["rlnClassNumber"].dtype == np.int64
    assert ds["rlnDefocusU"].values[0] == 13108.082418
    assert ds["rlnLogLikeliContribution"].values[0] == 2.586789e05
    assert star.per_particle(ds, "rlnImagePixelSize").tolist() == [2.806] * 5
    out = tmp_path / "copy.star"
    star.write_particles(out, ds)
    again = star.read_particles(out)
    assert_same(ds, again)
    assert_text_matches(src, out)
    # a second generation is byte-identical: the writer is deterministic
    star.write_particles(tmp_path / "copy2.star", again)
    assert (tmp_path / "copy2.star").read_text() == out.read_text()


@needs_data
@pytest.mark.filterwarnings("ignore:Map ID string not found", "ignore:Unrecognised machine stamp")
def test_relion31_images_resolve_to_local_stack():
    ds = star.read_particles(DATA / "particles" / "relion31.star")
    names = star.image_names(ds)
    assert [i for _, i in names] == [0, 1, 2, 3, 4]
    assert {p.name for p, _ in names} == {"relion31.mrcs"}
    imgs = star.read_particle_images(ds)
    assert imgs.shape == (5, 256, 256) and imgs.dtype == np.float32
    with mrcfile.mmap(DATA / "particles" / "relion31.mrcs", permissive=True) as m:
        assert np.array_equal(imgs, m.data)
    assert np.array_equal(star.read_particle_images(ds, [3, 1]), imgs[[3, 1]])


@needs_data
def test_relion5_reads_and_round_trips(tmp_path):
    src = DATA / "particles" / "relion5.star"
    ds = star.read_particles(src)
    assert ds.attrs["star_version"] == 50001
    assert ds.sizes["optics"] == 1 and ds.sizes["particle"] > 0
    raw = _starlite().read_star(src)["optics"]
    for col in ("rlnOddZernike", "rlnEvenZernike"):
        assert ds[col].dtype == object and ds[col].values.tolist() == raw[col]
        assert ds[col].values[0].startswith("[")
    assert ds["rlnMagMat01"].values[0] == -7.04404e-04
    star.write_particles(tmp_path / "r5.star", ds)
    assert_same(ds, star.read_particles(tmp_path / "r5.star"))
    assert_text_matches(src, tmp_path / "r5.star")


@needs_data
@pytest.mark.filterwarnings("ignore:Map ID string not found", "ignore:Unrecognised machine stamp")
def test_legacy_toy_projections():
    ds = star.read_particles(DATA / "particles" / "toy_projections.star")
    assert ds.attrs["star_version"] == "pre-3.1" and ds.attrs["star_block"] == "images"
    assert ds.sizes["particle"] == 1000 and ds.sizes["optics"] == 1
    assert ds["optics"].values.tolist() == [1] and ds["rlnOpticsGroup"].values.tolist() == [1] * 1000
    assert ds["rlnVoltage"].dims == ("optics",) and ds["rlnVoltage"].values.tolist() == [300.0]
    assert ds["rlnSphericalAberration"].values.tolist() == [0.001]
    assert ds["rlnAmplitudeContrast"].values.tolist() == [0.1]
    assert "rlnImagePixelSize" not in ds  # the file carries no pixel size
    raw = _starlite().read_star(DATA / "particles" / "toy_projections.star")["images"]
    assert ds["dummyVariable"].values.tolist() == [int(s) for s in raw["dummyVariable"]]
    assert ds.attrs["star_particle_columns"][-1] == "rlnOpticsGroup"
    imgs = star.read_particle_images(ds, [0, 999])
    assert imgs.shape == (2, 30, 30) and np.all(np.isfinite(imgs))
    with mrcfile.mmap(DATA / "particles" / "toy_projections.mrcs", permissive=True) as m:
        assert np.array_equal(imgs[1], m.data[999])


@needs_data
def test_relion_projections_origins_in_angstrom():
    ds = star.read_particles(DATA / "relion_projections" / "ctf" / "particles_true.star")
    assert ds.sizes["particle"] == 300 and ds.attrs["origin_units"] == "A"
    ox, oy = ds["rlnOriginXAngst"].values, ds["rlnOriginYAngst"].values
    assert np.abs(ox).max() <= 15.0 + 1e-9 and np.abs(oy).max() <= 15.0 + 1e-9  # ±3 px at 5 Å
    assert np.abs(ox).max() > 5.0  # really Å, not px
    assert star.per_particle(ds, "rlnImagePixelSize").tolist() == [5.0] * 300
    assert star.per_particle(ds, "rlnSphericalAberration")[0] == 2.7
    assert star.read_particle_images(ds, [0, 299]).shape == (2, 64, 64)


def test_legacy_conversion_builds_groups_and_converts_origins(tmp_path):
    path = tmp_path / "old.star"
    path.write_text(
        "data_\n\nloop_\n_rlnImageName #1\n_rlnVoltage #2\n_rlnMagnification #3\n"
        "_rlnDetectorPixelSize #4\n_rlnOriginX #5\n_rlnOriginY #6\n_rlnAngleRot #7\n"
        "1@a.mrcs 300 10000 14 2.0 -1.5 10\n"
        "2@a.mrcs 200 10000 14 1.0 0 20\n"
        "3@a.mrcs 300 10000 14 -3 4 30\n"
        "4@a.mrcs 300 20000 14 1 1 40\n"
    )
    ds = star.read_particles(path)
    assert ds.attrs["star_version"] == "pre-3.1" and ds.attrs["origin_units"] == "A"
    assert ds["rlnOpticsGroup"].values.tolist() == [1, 2, 1, 3]
    assert ds["rlnVoltage"].values.tolist() == [300.0, 200.0, 300.0]
    assert ds["rlnImagePixelSize"].values.tolist() == [14.0, 14.0, 7.0]
    assert ds["rlnOpticsGroupName"].values.tolist() == ["opticsGroup1", "opticsGroup2", "opticsGroup3"]
    assert ds.attrs["star_particle_columns"] == ["rlnImageName", "rlnOriginXAngst", "rlnOriginYAngst",
                                                 "rlnAngleRot", "rlnOpticsGroup"]
    assert ds["rlnOriginXAngst"].values.tolist() == [28.0, 14.0, -42.0, 7.0]
    assert ds["rlnOriginYAngst"].values.tolist() == [-21.0, 0.0, 56.0, 7.0]
    assert ds["rlnAngleRot"].dtype == np.float64  # written as "10" but a real-valued label
    # written as RELION 3.1 and read back unchanged
    star.write_particles(tmp_path / "new.star", ds)
    back = star.read_particles(tmp_path / "new.star")
    assert back.attrs["star_version"] == 30001
    assert_same(ds, back)


def test_legacy_origins_without_pixel_size(tmp_path):
    path = tmp_path / "old.star"
    path.write_text("data_images\nloop_\n_rlnImageName\n_rlnOriginX\n_rlnOriginY\n1@a.mrcs 2.5 -1\n")
    ds = star.read_particles(path)
    assert ds.attrs["origin_units"] == "px" and ds["rlnOriginX"].values.tolist() == [2.5]
    assert "optics" not in ds.dims
    ds = star.read_particles(path, pixel_size=2.0)
    assert ds.attrs["origin_units"] == "A" and ds["rlnOriginXAngst"].values.tolist() == [5.0]


def test_coordinates_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    x, y = rng.uniform(0, 4000, 50), rng.uniform(0, 4000, 50)
    fom = rng.normal(size=50)
    cls = rng.integers(1, 4, 50)
    path = tmp_path / "mic001_autopick.star"
    star.write_coordinates(path, x, y, extra={"rlnAutopickFigureOfMerit": fom, "rlnClassNumber": cls})
    ds = star.read_particles(path)
    assert ds.attrs["star_block"] == "" and ds.attrs["star_optics_columns"] == []
    assert ds.attrs["star_particle_columns"] == ["rlnCoordinateX", "rlnCoordinateY",
                                                 "rlnAutopickFigureOfMerit", "rlnClassNumber"]
    assert ds["rlnCoordinateX"].values.tolist() == x.tolist()
    assert ds["rlnCoordinateY"].values.tolist() == y.tolist()
    assert ds["rlnAutopickFigureOfMerit"].values.tolist() == fom.tolist()
    assert ds["rlnClassNumber"].values.tolist() == cls.tolist()
    table = _starlite().particle_table(path)  # what pick_f1.py sees
    assert [float(v) for v in table["rlnCoordinateX"]] == x.tolist()


def test_floats_strings_and_new_columns_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    n = 400
    vals = rng.normal(size=n) * 10.0 ** rng.integers(-12, 12, n)
    vals[:4] = [0.0, -0.0, 1e-300, 123456789.123456789]
    ds = xr.Dataset(
        {
            "rlnDefocusU": ("particle", vals),
            "rlnMicrographName": ("particle", np.array([f"mic {i % 3}.mrc" for i in range(n)], dtype=object)),
            "rlnClassNumber": ("particle", np.arange(n, dtype=np.int64)),
            "rlnOpticsGroup": ("particle", np.ones(n, np.int64)),
            "rlnVoltage": ("optics", np.array([300.0])),
        },
        coords={"optics": ("optics", np.array([1]))},
        attrs={"star_particle_columns": ["rlnClassNumber", "rlnDefocusU"], "star_optics_columns": []},
    )
    ds["rlnAngleRot"] = ("particle", rng.uniform(-180, 180, n))  # added later: goes last
    path = tmp_path / "synth.star"
    star.write_particles(path, ds)
    back = star.read_particles(path)
    assert back.attrs["star_particle_columns"] == ["rlnClassNumber", "rlnDefocusU", "rlnMicrographName",
                                                   "rlnOpticsGroup", "rlnAngleRot"]
    assert back.attrs["star_optics_columns"] == ["rlnOpticsGroup", "rlnVoltage"]
    for v in ("rlnDefocusU", "rlnMicrographName", "rlnClassNumber", "rlnAngleRot", "rlnVoltage"):
        assert back[v].values.tolist() == ds[v].values.tolist(), v
    text = path.read_text()
    assert '"mic 1.mrc"' in text and text.count("_rlnOpticsGroup #") == 2  # once per block
    assert text.splitlines()[1] == "# version 30001"


def test_require_columns_names_missing(tmp_path):
    path = tmp_path / "c.star"
    star.write_coordinates(path, [1.0], [2.0])
    ds = star.read_particles(path)
    star.require_columns(ds, ["rlnCoordinateX"], path)
    with pytest.raises(InputError, match=r"c\.star: missing required column\(s\) rlnAngleRot, rlnImageName"):
        star.require_columns(ds, ["rlnCoordinateX", "rlnAngleRot", "rlnImageName"], path)


def test_image_lookup_fallback_and_missing_stack(tmp_path):
    stack = np.random.default_rng(7).normal(size=(3, 8, 8)).astype(np.float32)
    write_stack(tmp_path / "parts.mrcs", stack, 2.0)
    names = [star.format_image_name(i, "Extract/job007/parts.mrcs") for i in (2, 0)]
    assert names[0] == "000003@Extract/job007/parts.mrcs"
    (tmp_path / "p.star").write_text("data_\nloop_\n_rlnImageName\n" + "\n".join(names) + "\n")
    ds = star.read_particles(tmp_path / "p.star")
    assert star.image_names(ds) == [(tmp_path / "parts.mrcs", 2), (tmp_path / "parts.mrcs", 0)]
    assert np.array_equal(star.read_particle_images(ds), stack[[2, 0]])
    (tmp_path / "q.star").write_text("data_\nloop_\n_rlnImageName\n000001@elsewhere/missing.mrcs\n")
    with pytest.raises(InputError, match=r"q\.star: image stack 'elsewhere/missing\.mrcs' not found"):
        star.image_names(star.read_particles(tmp_path / "q.star"))
    (tmp_path / "r.star").write_text("data_\nloop_\n_rlnImageName\n000009@parts.mrcs\n")
    with pytest.raises(InputError, match=r"parts\.mrcs: image index 8 .* 3 images"):
        star.read_particle_images(star.read_particles(tmp_path / "r.star"))


def test_unparsable_star_files(tmp_path):
    (tmp_path / "empty.star").write_text("just some text\nno blocks here\n")
    with pytest.raises(InputError, match=r"empty\.star: not a STAR file"):
        star.read_star_blocks(tmp_path / "empty.star")
    (tmp_path / "ragged.star").write_text("data_\nloop_\n_rlnA\n_rlnB\n1 2 3 4\n")
    with pytest.raises(InputError, match=r"ragged\.star: cannot parse STAR file"):
        star.read_particles(tmp_path / "ragged.star")
    (tmp_path / "short.star").write_text("data_\nloop_\n_rlnA\n_rlnB\n1 2\n3\n")
    with pytest.raises(InputError, match=r"short\.star: a data row has fewer values"):
        star.read_particles(tmp_path / "short.star")
    (tmp_path / "nan.star").write_text("data_\nloop_\n_rlnA\n_rlnB\n1 nan\n3 4\n")
    assert np.isnan(star.read_particles(tmp_path / "nan.star")["rlnB"].values[0])
    with pytest.raises(InputError, match=r"none\.star: file not found"):
        star.read_particles(tmp_path / "none.star")
