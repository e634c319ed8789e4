"""Data model, laziness of stages, ingest of bad inputs, CLI error handling."""
import json

import dask
import dask.array as da
import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryodask.cli import main
from cryodask.model import PARTICLE_CHUNK, micrograph_dataset, particle_chunk, microscope_attrs, open_group, particle_dataset, provenance, write_group


def _no_compute(*args, **kwargs):
    raise RuntimeError("the graph was computed while it was being built")


def test_stage_builds_lazily_and_matches_eager_reference():
    from cryodask.preprocess import preprocess_graph, preprocess_micrograph

    rng = np.random.default_rng(0)
    mics = rng.normal(size=(3, 256, 256)).astype(np.float32)
    arr = da.from_array(mics, chunks=(1, 256, 256))
    with dask.config.set(scheduler=_no_compute):
        lazy = preprocess_graph(arr, 2.0, 60.0)
        ds = micrograph_dataset(lazy, ["a", "b", "c"], microscope_attrs(2.0))
    assert isinstance(ds["image"].data, da.Array)
    got = ds["image"].values
    ref = np.stack([preprocess_micrograph(m, 2.0, 60.0) for m in mics])
    assert np.allclose(got, ref, atol=1e-6)


def test_store_roundtrip_keeps_attrs_chunks_and_strings(tmp_path):
    imgs = da.random.random((5000, 16, 16), chunks=(1000, 16, 16)).astype(np.float32)
    t = pd.DataFrame({"rlnCoordinateX": np.arange(5000.0), "cdViewClass": ["top", "side"] * 2500})
    ds = particle_dataset(imgs, t, {**microscope_attrs(1.5, 200, 2.0, 0.07), **provenance("test", {"a": 1}, "x.star")})
    write_group(ds, tmp_path / "s.zarr", "particles")
    back = open_group(tmp_path / "s.zarr", "particles")
    # 5,000 particles: at least 5 chunks of ≤ 1,024, rounded up to 8 equal chunks (input chunks were 1000)
    assert back["image"].chunks[0] == (625,) * 8 and particle_chunk(5000) == 625
    assert back.attrs["pixel_size"] == 1.5 and back.attrs["voltage"] == 200 and back.attrs["cs"] == 2.0
    assert json.loads(back.attrs["parameters"]) == {"a": 1} and back.attrs["stage"] == "test"
    assert list(back["cdViewClass"].values[:2]) == ["top", "side"]
    assert back["image"].dtype == np.float32
    assert np.array_equal(back["image"].values, ds["image"].values)


def _write(path, arr, apix=2.0):
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.asarray(arr, np.float32))
        m.voxel_size = apix


def test_ingest_skips_and_records_bad_files(tmp_path):
    from cryodask.ingest import expand_inputs, ingest_micrographs

    rng = np.random.default_rng(1)
    for i in range(3):
        _write(tmp_path / f"good{i}.mrc", rng.normal(size=(128, 96)))
    nan = rng.normal(size=(128, 96))
    nan[3, 3] = np.nan
    _write(tmp_path / "nan.mrc", nan)
    _write(tmp_path / "small.mrc", rng.normal(size=(64, 64)))
    _write(tmp_path / "trunc.mrc", rng.normal(size=(128, 96)))
    with open(tmp_path / "trunc.mrc", "r+b") as f:
        f.truncate(3000)
    (tmp_path / "junk.mrc").write_bytes(b"not an mrc file at all" * 10)
    ds, bad = ingest_micrographs(expand_inputs([str(tmp_path / "*.mrc")]), tmp_path / "store.zarr")
    assert sorted(ds["micrograph"].values) == ["good0", "good1", "good2"]
    reasons = {b["file"].split("/")[-1]: b["reason"] for b in bad}
    assert set(reasons) == {"nan.mrc", "small.mrc", "trunc.mrc", "junk.mrc"}
    assert "NaN" in reasons["nan.mrc"] and "truncated" in reasons["trunc.mrc"] and "wrong size" in reasons["small.mrc"]
    assert all(name in r for name, r in reasons.items())  # every message names its file
    assert ds.attrs["pixel_size"] == 2.0
    assert np.allclose(ds["image"].values[0], mrcfile.read(tmp_path / "good0.mrc"))


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "junk.mrc").write_bytes(b"\0" * 10)
    rc = main(["run", "--micrographs", str(tmp_path / "junk.mrc"), "--diameter", "100", "--pixel-size", "1",
               "--out", str(tmp_path / "o"), "--cluster", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert "junk.mrc" in err[-1] and "Traceback" not in "\n".join(err)


def test_cli_missing_star_columns(tmp_path, capsys):
    from cryodask.io.star import read_particles, require_columns

    star = tmp_path / "p.star"
    star.write_text("data_particles\nloop_\n_rlnCoordinateX #1\n10\n20\n")
    with pytest.raises(Exception) as e:
        require_columns(read_particles(star), ["rlnCoordinateX", "rlnCoordinateY"], star)
    assert "p.star" in str(e.value) and "rlnCoordinateY" in str(e.value)


def test_cli_usage_error_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["simulate", "--views", "diagonal", "--out", "x"])
    assert e.value.code == 2


def test_cli_help_for_every_subcommand(capsys):
    from cryodask.cli import build_parser

    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices
    assert {"simulate", "run", "demo"} <= set(subs)
    for name in subs:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0


def test_particle_chunks_are_equal_and_divide_over_common_worker_counts():
    assert PARTICLE_CHUNK == 1024
    for n, k in ((1, 1), (1024, 1), (1025, 2), (3000, 4), (5000, 8), (8192, 8), (8193, 16), (12546, 16),
                 (100_000, 104)):
        c = particle_chunk(n)
        assert c <= PARTICLE_CHUNK and -(-n // c) == k, (n, c)
        assert n - (k - 1) * c > 0.9 * c or n < 8  # the last chunk is (nearly) as large as the others
