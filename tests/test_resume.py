"""Resume after SIGKILL: a re-run of the same command redoes only the missing work and gives
outputs identical to an uninterrupted run; a changed parameter re-runs exactly the stages that
read its stage's output."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

STAGES = "ingest,preprocess,ctf,pick,extract,align2d"
KILL_STAGES = STAGES + ",refine"  # the kill test runs to the final map (fast refinement settings)
N_MICS = 3

# the command, run in a subprocess; SLOW_GROUP makes the chunk writes of one store group slow
# (chunk i commits after 0.8·(i+1) s) so that the test can kill the job between two chunks
DRIVER = """
import os, sys, time
slow = os.environ.get("SLOW_GROUP")
if slow:
    import cryodask.model as m
    _orig = m._write_block
    def _slow(block, store, path, start, marker):
        if path.startswith(slow + "/"):
            time.sleep(0.8 * (start + 1))
        return _orig(block, store, path, start, marker)
    m._write_block = _slow
from cryodask.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    import dask

    from cryodask.simulate_job import SimulationConfig, run_simulation

    root = tmp_path_factory.mktemp("resume")
    with dask.config.set(scheduler="threads"):
        run_simulation(SimulationConfig(volume="apoferritin", out=str(root / "sim"), n_micrographs=N_MICS,
                                        micrograph_size=512, pixel_size=3.0, seed=21))
    (root / "driver.py").write_text(DRIVER)
    (root / "run.yaml").write_text("refine:\n  fast: true\n")
    return root


def _cmd(root: Path, out: str) -> list[str]:
    return [sys.executable, str(root / "driver.py"), "run", str(root / "run.yaml"), "--micrographs",
            str(root / "sim" / "micrographs" / "*.mrc"), "--pixel-size", "3", "--diameter", "120", "--symmetry", "O",
            "--seed", "5", "--stages", KILL_STAGES, "--out", str(root / out), "--cluster", "none"]


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _run(root: Path, out: str, **env) -> str:
    r = subprocess.run(_cmd(root, out), capture_output=True, text=True, env=_env(**env), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


def _start_and_kill(root: Path, out: str, ready, what: str, **env) -> None:
    """Start the command, SIGKILL it as soon as ``ready()`` is true (while it is still running)."""
    p = subprocess.Popen(_cmd(root, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(**env))
    try:
        t0 = time.monotonic()
        while not ready():
            assert p.poll() is None, f"the job ended (rc {p.returncode}) before {what}"
            assert time.monotonic() - t0 < 300, f"timed out waiting for {what}"
            time.sleep(0.02)
        assert p.poll() is None, f"the job ended before it could be killed during {what}"
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL


def _checksums(out: Path) -> dict[str, str]:
    """sha256 of every array in the zarr stores and of every STAR/CSV file (paths of the output
    folder replaced, so two folders compare)."""
    import zarr

    sums: dict[str, str] = {}

    def walk(group, prefix):
        for name, arr in group.arrays():
            a = np.asarray(arr[...])
            data = "\x00".join(map(str, a.ravel().tolist())).encode() if a.dtype.kind in "OTU" else a.tobytes()
            sums[f"{prefix}/{name}"] = hashlib.sha256(data + str(a.dtype).encode() + str(a.shape).encode()).hexdigest()
        for name, sub in group.groups():
            walk(sub, f"{prefix}/{name}")

    for store in sorted(out.rglob("*.zarr")):
        walk(zarr.open_group(str(store), mode="r"), store.relative_to(out).as_posix())
    for f in sorted(list(out.rglob("*.star")) + list(out.rglob("*.csv"))):
        text = f.read_text().replace(str(out), "OUT")
        sums[f.relative_to(out).as_posix()] = hashlib.sha256(text.encode()).hexdigest()
    import mrcfile

    for f in sorted(list(out.rglob("*.mrc")) + list(out.rglob("*.mrcs"))):  # the maps and the refined stack
        sums[f.relative_to(out).as_posix()] = hashlib.sha256(np.ascontiguousarray(mrcfile.read(f)).tobytes()).hexdigest()
    return sums


def _markers(out: Path, group: str) -> int:
    d = out / "stages" / f"{group}.chunks"
    return len(list(d.glob("image.*"))) if d.is_dir() else 0


@pytest.mark.slow
def test_sigkill_then_rerun_redoes_only_missing_work_and_matches(sim):
    root = sim
    _run(root, "ref")  # uninterrupted reference
    ref = _checksums(root / "ref")
    assert any(k.startswith("store.zarr/particles/") for k in ref) and "align2d/particles_aligned.star" in ref
    assert {"map.mrc", "half1.mrc", "half2.mrc", "particles.star"} <= set(ref)  # the final map and its STAR

    out = root / "killed"
    # 1) killed while the preprocessed micrographs are being committed, between two chunks
    _start_and_kill(root, "killed", lambda: _markers(out, "preprocessed") >= 1, "preprocess chunks",
                    SLOW_GROUP="preprocessed")
    done = _markers(out, "preprocessed")
    assert 1 <= done < N_MICS
    assert (out / "stages" / "ingest.json").exists() and not (out / "stages" / "preprocess.json").exists()

    # 2) the same command again, killed during the 2D alignment: ingest was not recomputed,
    #    preprocess wrote only the chunks that had no completion record
    log2 = out / "run.log"
    mark = log2.stat().st_size
    _start_and_kill(root, "killed", lambda: "stage align2d: start" in log2.read_text()[mark:], "align2d")
    text = log2.read_text()[mark:]
    assert "stage ingest: up to date" in text
    assert (f"preprocess: resuming: {done} of {N_MICS} chunk(s) of preprocessed already committed, "
            f"writing the other {N_MICS - done}") in text
    assert "computing: ingest" not in text
    assert not (out / "stages" / "align2d.json").exists()

    # 3) and again, to the end: every stage before align2d comes from its completion record
    err = _run(root, "killed")
    for stage in ("ingest", "preprocess", "ctf", "pick", "extract"):
        assert f"stage {stage}: up to date" in err, stage
    assert "stage align2d: start" in err and "stage align2d: done" in err and "stage refine: done" in err
    assert "computing:" not in err.split("stage align2d: start")[0]  # nothing recomputed before align2d

    got = _checksums(out)
    assert sorted(got) == sorted(ref)
    diff = [k for k in ref if got[k] != ref[k]]
    assert diff == [], f"outputs differ from the uninterrupted run: {diff}"
    rep = json.loads((out / "report.json").read_text())
    assert [k for k, v in rep["stages"].items() if v.get("resumed")] == ["ingest", "preprocess", "ctf", "pick",
                                                                          "extract"]


def _stage_runs(out: Path, cfg_kw: dict) -> tuple[list[str], list[str]]:
    from cryodask.pipeline import RunConfig, run_pipeline

    cfg = RunConfig.load(None, overrides={"micrographs": [str(out.parent / "sim" / "micrographs" / "*.mrc")],
                                          "pixel_size": 3.0, "diameter": 120.0, "seed": 5, "out": str(out),
                                          "stages": STAGES, **cfg_kw})
    rep = run_pipeline(cfg, None)
    resumed = [k for k, v in rep["stages"].items() if v.get("resumed")]
    return resumed, [k for k in rep["stages"] if k not in resumed]


@pytest.mark.slow
def test_changed_parameter_reruns_exactly_the_dependent_stages(sim):
    out = sim / "params"
    if (sim / "ref").exists():  # start from the finished reference run (same parameters)
        shutil.copytree(sim / "ref", out)
    resumed, ran = _stage_runs(out, {})
    assert ran == [] or not (sim / "ref").exists()

    # extraction box: extract and the alignment re-run
    resumed, ran = _stage_runs(out, {"extract": {"factor": 1.7}})
    assert ran == ["extract", "align2d"] and resumed == ["ingest", "preprocess", "ctf", "pick"]
    # preprocessing: preprocess and what reads it (picking picks the stored preprocessed
    # micrographs, extract cuts its preprocessed boxes from them, then align2d); CTF reads the raw
    # micrographs and is kept
    resumed, ran = _stage_runs(out, {"extract": {"factor": 1.7}, "preprocess": {"binning": 2.0}})
    assert ran == ["preprocess", "pick", "extract", "align2d"] and resumed == ["ingest", "ctf"]
    # only the alignment's own setting: only align2d
    resumed, ran = _stage_runs(out, {"extract": {"factor": 1.7}, "preprocess": {"binning": 2.0},
                                     "align2d": {"variant": "global-mask"}})
    assert ran == ["align2d"]
    # a setting every stage after ingest uses (the seed; ingest does not use it)
    resumed, ran = _stage_runs(out, {"seed": 6})
    assert resumed == ["ingest"] and ran == ["preprocess", "ctf", "pick", "extract", "align2d"]


def test_pick_reads_the_stored_preprocessed_micrographs(sim, monkeypatch):
    """The pick stage picks the micrographs that the preprocess stage stored (its settings
    apply, nothing is preprocessed again) and writes coordinates in pixels of the original
    micrographs: with the default settings exactly the picks of preprocessing inside the picking
    graph; with a coarser binning the same particles, and a changed binning re-picks."""
    import dask
    import dask.array as da
    import mrcfile

    import cryodask.preprocess as pre_mod
    from cryodask.evaluate import load_truth
    from cryodask.pick import evaluate_picks, pick_graph

    out = sim / "pick_reads_preprocessed"
    resumed, ran = _stage_runs(out, {"stages": "ingest,preprocess"})
    assert ran == ["ingest", "preprocess"]

    def no_preprocessing(*a, **k):
        raise AssertionError("the pick stage preprocessed a micrograph again")

    with monkeypatch.context() as m:
        m.setattr(pre_mod, "preprocess_micrograph", no_preprocessing)
        resumed, ran = _stage_runs(out, {"stages": "ingest,preprocess,pick"})
    assert resumed == ["ingest", "preprocess"] and ran == ["pick"]
    star = _read_star_picks(out)

    # the same picks as the picking graph that preprocesses the raw micrographs itself
    files = sorted((sim / "sim" / "micrographs").glob("*.mrc"))
    raw = np.stack([mrcfile.read(f).astype(np.float32) for f in files])
    names = sorted(star)
    assert names == [f.stem for f in files]
    g = pick_graph(da.from_array(raw, chunks=(1,) + raw.shape[1:]), names, 3.0, 120.0)
    ref = dict(zip(names, dask.compute(*[g[n] for n in names], scheduler="sync")))
    for n in names:
        np.testing.assert_allclose(star[n], ref[n][["x", "y"]].to_numpy(float), atol=1e-3)
    truth = load_truth(str(sim / "sim"))
    tr = {n: truth.loc[truth["mic"] == n, ["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float) for n in names}
    f1 = evaluate_picks(star, tr, 10.0)["f1"]
    assert f1 >= 0.9  # measured 0.99

    # a coarser preprocessing binning: pick re-runs on the binned micrographs, and its coordinates
    # are still pixels of the originals (the same particles are found)
    resumed, ran = _stage_runs(out, {"stages": "ingest,preprocess,pick", "preprocess": {"binning": 2.0}})
    assert resumed == ["ingest"] and ran == ["preprocess", "pick"]
    binned = _read_star_picks(out)
    assert sum(map(len, binned.values())) != sum(map(len, star.values())) or any(
        not np.allclose(binned[n], star[n]) for n in names)  # other images: other picks
    assert evaluate_picks(binned, tr, 10.0)["f1"] >= 0.85


def _read_star_picks(out: Path) -> dict[str, np.ndarray]:
    from cryodask.pipeline import Context, RunConfig, _read_picks

    ctx = Context(RunConfig(micrographs=["x"], diameter=1.0, out=str(out)))
    t = _read_picks(ctx)
    return {str(m): g[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float)
            for m, g in t.groupby("rlnMicrographName", sort=True)}


def test_report_html_has_stage_timings_counts_accuracy_and_log_link(tmp_path):
    from cryodask.report import write_report

    (tmp_path / "run.log").write_text("log\n")
    rep = {"stages": {"ingest": {"n_micrographs": 3, "n_bad": 1, "pixel_size_A": 3.0, "resumed": True},
                      "pick": {"n_picks": 185, "method": "ibc", "truth": {"f1": 0.9973, "precision": 1.0}},
                      "ctf": {"n_micrographs": 3, "warning": "1 micrograph(s) show fewer than 2 CTF zeros"}},
           "timings_s": {"ingest": 1.63, "pick": {"seconds": 12.25}, "ctf": 2.0}, "total_seconds": 15.9,
           "bad_inputs": [{"file": "x.mrc", "reason": "x.mrc: not an MRC file"}], "summary": "ingest: ok"}
    page = write_report(tmp_path, rep, [("picks", "picks.png")]).read_text()
    assert '<a href="run.log">run.log</a>' in page
    stages = page.split("<h2>Stages</h2>")[1].split("</table>")[0]
    rows = {r.split("</th>")[0].split(">")[-1]: r for r in stages.split("<tr")[2:]}
    assert set(rows) == {"ingest", "pick", "ctf", "total"}
    assert "resumed" in rows["ingest"] and "1.6 (earlier run)" in rows["ingest"] and "n_bad: 1" in rows["ingest"]
    assert "ran" in rows["pick"] and ">12.2<" in rows["pick"] and "n_picks: 185" in rows["pick"]
    assert "f1: 0.9973" in rows["pick"] and "precision: 1" in rows["pick"]
    assert "fewer than 2 CTF zeros" in rows["ctf"]
    assert ">15.9<" in rows["total"]
    assert "x.mrc: not an MRC file" in page and 'src="picks.png"' in page
    assert json.loads((tmp_path / "report.json").read_text()) == rep
