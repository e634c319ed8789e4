"""Collections: `cryodask run collection.yaml` runs several datasets on one cluster, one summary,
and a broken dataset is reported without stopping the others."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cryodask.cli import main

STAGES = "[ingest, preprocess, ctf, pick, extract]"


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory) -> Path:
    """Two small apoferritin-like datasets at different pixel sizes (3.0 and 2.4 Å/px); their
    micrographs have the same file names (mic_0001, mic_0002), as real collections often do."""
    import dask

    from cryodask.simulate_job import SimulationConfig, run_simulation

    root = tmp_path_factory.mktemp("collection")
    with dask.config.set(scheduler="threads"):
        for name, apix, seed in (("a", 3.0, 11), ("b", 2.4, 12)):
            run_simulation(SimulationConfig(volume="apoferritin", out=str(root / f"sim_{name}"), n_micrographs=2,
                                            micrograph_size=512, pixel_size=apix, seed=seed))
    bad = root / "corrupt"
    bad.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):  # not MRC files at all
        (bad / f"m{i}.mrc").write_bytes(rng.integers(0, 255, 4000, dtype=np.uint8).tobytes())
    return root


def _truth_count(sim: Path) -> int:
    import starfile

    t = starfile.read(sim / "truth_particles.star")
    return len(t["particles"] if isinstance(t, dict) else t)


@pytest.mark.slow
def test_collection_runs_on_one_cluster_and_isolates_failures(two_datasets, monkeypatch, capsys):
    root = two_datasets
    monkeypatch.chdir(root)
    (root / "coll.yaml").write_text(f"""\
out: out
concurrent: 4
cluster: {{kind: local, n_workers: 2, processes: false, dashboard_address: ":0"}}
stages: {STAGES}
seed: 3
datasets:
  - {{name: apo_3A, micrographs: sim_a/micrographs/*.mrc, pixel_size: 3.0, diameter: 120, symmetry: O,
     voltage: 300, cs: 2.7, amplitude_contrast: 0.1, truth: sim_a}}
  - {{name: apo_2.4A, micrographs: sim_b/micrographs/*.mrc, pixel_size: 2.4, diameter: 120, symmetry: O,
     truth: sim_b, pick: {{method: ibc}}}}
  - {{name: corrupt, micrographs: corrupt/*.mrc, pixel_size: 2.0, diameter: 100}}
  - {{name: bad_path, micrographs: no/such/folder/*.mrc, pixel_size: 2.0, diameter: 100}}
""")
    rc = main(["run", "coll.yaml"])
    assert rc == 1  # some datasets failed
    assert "2 of 4 dataset(s) ok, 2 failed" in capsys.readouterr().out

    out = root / "out"
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["name"]: r for r in summary["datasets"]}
    assert [r["name"] for r in summary["datasets"]] == ["apo_3A", "apo_2.4A", "corrupt", "bad_path"]
    assert (summary["n_ok"], summary["n_failed"]) == (2, 2)
    # one cluster for all: a distributed scheduler with the configured two workers
    assert summary["cluster"]["n_workers"] == 2 and summary["cluster"]["scheduler"].startswith("inproc://")

    # the failures, each with its reason
    assert rows["corrupt"]["status"] == "failed" and "no readable micrographs" in rows["corrupt"]["error"]
    assert "not an MRC file" in rows["corrupt"]["error"]
    assert rows["bad_path"]["status"] == "failed" and "no micrographs match" in rows["bad_path"]["error"]
    assert "no/such/folder" in rows["bad_path"]["error"]
    assert "no readable micrographs" in (out / "corrupt" / "run.log").read_text()

    # the good datasets ran concurrently on that cluster, each with its own pixel size
    a, b = rows["apo_3A"], rows["apo_2.4A"]
    assert a["status"] == b["status"] == "ok", (a.get("error"), b.get("error"))
    assert a["started_s"] < b["finished_s"] and b["started_s"] < a["finished_s"]  # overlapping in time
    assert a["pixel_size_A"] == 3.0 and b["pixel_size_A"] == 2.4
    assert a["n_micrographs"] == b["n_micrographs"] == 2
    # the same particle (120 Å) boxed at each dataset's own scale
    assert b["box_px"] > a["box_px"]
    assert b["box_px"] / a["box_px"] == pytest.approx(3.0 / 2.4, rel=0.1)
    # each dataset's picks match its own ground truth (no mixing between datasets whose
    # micrographs share file names)
    for r, sim in ((a, "sim_a"), (b, "sim_b")):
        assert r["pick_f1"] > 0.85, (r["name"], r["pick_f1"])
        assert abs(r["n_picks"] - _truth_count(root / sim)) <= 0.15 * _truth_count(root / sim)
        rep = json.loads((out / r["name"] / "report.json").read_text())
        assert rep["config"]["pixel_size"] == r["pixel_size_A"]
        assert list(rep["stages"]) == ["ingest", "preprocess", "ctf", "pick", "extract"]
        assert (out / r["name"] / "store.zarr" / "particles").is_dir()
        log = (out / r["name"] / "run.log").read_text()
        # ctf runs in a thread of its own beside preprocess → pick: its lines still reach this log
        for stage in ("ctf", "pick", "extract"):
            assert f"[{r['name']}] stage {stage}: done" in log
        other = "apo_2.4A" if r is a else "apo_3A"
        assert f"[{other}]" not in log  # each dataset's run log holds only its own lines

    page = (out / "summary.html").read_text()
    for name in rows:
        assert name in page
    assert 'href="apo_3A/report.html"' in page and 'href="apo_2.4A/run.log"' in page
    assert "no readable micrographs" in page

    # a second run resumes every finished dataset from its completion records
    rc = main(["run", "coll.yaml"])
    assert rc == 1
    again = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["datasets"]}
    assert again["apo_3A"]["resumed"] == ["ingest", "preprocess", "ctf", "pick", "extract"]
    assert again["apo_2.4A"]["pick_f1"] == pytest.approx(b["pick_f1"])


def test_two_datasets_graphs_computed_together_stay_apart(two_datasets):
    """The datasets of a collection share one scheduler, and their micrographs may have the same
    names: the stage graphs must not collide on task keys (one dataset would get the other's
    results)."""
    import dask
    import dask.array as da
    import mrcfile

    from cryodask.pick import pick_graph

    graphs, alone = [], []
    for sim, apix in (("sim_a", 3.0), ("sim_b", 2.4)):
        files = sorted((two_datasets / sim / "micrographs").glob("*.mrc"))
        mics = da.from_array(np.stack([mrcfile.read(f) for f in files]).astype(np.float32), chunks=(1, -1, -1))
        names = [f.stem for f in files]
        graphs.append(pick_graph(mics, names, apix, 120.0))
        alone.append(dask.compute(pick_graph(mics, names, apix, 120.0), scheduler="sync")[0])
    together = dask.compute(*graphs, scheduler="sync")
    assert list(graphs[0]) == list(graphs[1])  # same micrograph names in both datasets
    for got, ref in zip(together, alone):
        for name in ref:
            np.testing.assert_array_equal(got[name][["x", "y"]].to_numpy(), ref[name][["x", "y"]].to_numpy())


def test_collection_structure_errors_are_input_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dup.yaml").write_text("datasets:\n  - {name: x, micrographs: a.mrc, diameter: 100}\n"
                                       "  - {name: x, micrographs: b.mrc, diameter: 100}\n")
    assert main(["run", "dup.yaml"]) == 2
    assert "two datasets are called 'x'" in capsys.readouterr().err
    (tmp_path / "empty.yaml").write_text("datasets: []\n")
    assert main(["run", "empty.yaml"]) == 2
    assert "non-empty list" in capsys.readouterr().err
    (tmp_path / "flags.yaml").write_text("datasets:\n  - {name: x, micrographs: a.mrc, diameter: 100}\n")
    assert main(["run", "flags.yaml", "--pixel-size", "2"]) == 2
    assert "--pixel-size cannot be used with a collection" in capsys.readouterr().err


def test_collection_dataset_settings_merge_with_defaults(tmp_path):
    from cryodask.collection import load_collection

    settings, entries = load_collection({
        "out": str(tmp_path / "o"), "seed": 4, "pick": {"method": "ibc", "ibc": {"a": 1}}, "voltage": 200,
        "datasets": [{"name": "one", "micrographs": "x/*.mrc", "diameter": 100, "pick": {"method": "deep"}},
                     {"name": "two", "micrographs": "y/*.mrc", "diameter": 150, "voltage": 300, "cs": 0.01},
                     {"name": "three", "micrographs": "z/*.mrc"}]})
    one, two, three = entries
    assert one["config"].pick == {"method": "deep", "ibc": {"a": 1}} and one["config"].voltage == 200
    assert one["config"].seed == two["config"].seed == 4
    assert two["config"].voltage == 300 and two["config"].cs == 0.01 and two["config"].pick["method"] == "ibc"
    assert one["config"].out == str(tmp_path / "o" / "one")
    assert three["config"] is None and "diameter is required" in three["error"]
