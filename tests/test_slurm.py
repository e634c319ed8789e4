"""The pipeline on a real SLURM cluster: `cryodask run --cluster slurm` must give the same outputs as
`--cluster local`.

Needs running slurmctld/slurmd daemons (``.ci/run`` starts a single-node cluster on loopback with
deploy/slurm/start_local_slurm.sh and sets CRYODASK_TEST_SLURM=1). Skipped when SLURM is not
there; when CRYODASK_TEST_SLURM=1 says it is, a missing piece is a failure, not a skip.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REQUIRED = os.environ.get("CRYODASK_TEST_SLURM") == "1"


def _slurm_answers() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and any(s.strip("*~#") in ("idle", "mix") for s in r.stdout.split())


@pytest.fixture(scope="module")
def slurm():
    if not (REQUIRED or _slurm_answers()):
        pytest.skip("no SLURM cluster answers (start one with deploy/slurm/start_local_slurm.sh)")
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        if REQUIRED:
            pytest.fail("CRYODASK_TEST_SLURM=1 but dask-jobqueue is not installed (pip install 'cryodask[cluster]')")
        pytest.skip("dask-jobqueue is not installed")
    assert _slurm_answers(), "CRYODASK_TEST_SLURM=1 but `sinfo` shows no idle node"


def _cryodask(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "cryodask", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"cryodask {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}"
    return r


def _zarr_arrays(store: Path) -> dict[str, np.ndarray]:
    import zarr

    out: dict[str, np.ndarray] = {}

    def walk(group, prefix=""):
        for name, arr in group.arrays():
            out[prefix + name] = arr[...]
        for name, sub in group.groups():
            walk(sub, prefix + name + "/")

    walk(zarr.open_group(str(store), mode="r"))
    return out


def _stage_results(out: Path) -> dict[str, dict]:
    """Per-stage results from the completion records (timings dropped, paths relative to ``out``)."""
    def drop_timings(v):  # and the output folder's own path, which differs between the two runs
        if isinstance(v, dict):
            return {k: drop_timings(x) for k, x in v.items() if "second" not in k and "time" not in k}
        if isinstance(v, list):
            return [drop_timings(x) for x in v]
        return v.replace(str(out), "OUT") if isinstance(v, str) else v

    return {rec.stem: drop_timings(json.loads(rec.read_text())["result"])
            for rec in sorted((out / "stages").glob("*.json"))}


def _other_outputs(out: Path) -> dict[str, object]:
    """STAR files as text, MRC files as arrays (whatever later stages write)."""
    import mrcfile

    files: dict[str, object] = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if rel.startswith("store.zarr") or not p.is_file():
            continue
        if p.suffix == ".star":
            files[rel] = p.read_text()
        elif p.suffix in (".mrc", ".mrcs"):
            files[rel] = mrcfile.read(p)
    return files


def _our_jobs() -> list[str]:
    """Worker jobs still pending or running (completing ones are already being cleaned up)."""
    r = subprocess.run(["squeue", "-h", "-n", "cryodask-worker", "-t", "PENDING,RUNNING", "-o", "%i %T"],
                       capture_output=True, text=True)
    return [ln for ln in r.stdout.splitlines() if ln.strip()]


def test_slurm_run_equals_local_run(slurm, tmp_path):
    t0 = time.perf_counter()
    _cryodask("simulate", "--volume", "apoferritin", "--n-micrographs", "4", "--micrograph-size", "512",
              "--seed", "7", "--out", "sim", "--cluster", "none", cwd=tmp_path)
    logs = tmp_path / "slurm-logs"
    (tmp_path / "run.yaml").write_text(
        "micrographs: sim/micrographs/*.mrc\n"
        "diameter: 120\n"
        "seed: 7\n"
        "cluster:\n"
        "  kind: slurm\n"
        "  cores: 1\n"
        "  memory: 2GB\n"
        "  interface: lo\n"
        "  jobs: 2\n"
        "  walltime: '00:10:00'\n"
        "  dashboard_address: ':0'\n"
        "  queue: debug\n"
        f"  log_directory: {logs}\n"
        "  startup_timeout: 120\n")
    t1 = time.perf_counter()
    r = _cryodask("run", "run.yaml", "--out", "out_slurm", cwd=tmp_path)
    t2 = time.perf_counter()
    _cryodask("run", "run.yaml", "--out", "out_local", "--cluster", "local", "--workers", "2", cwd=tmp_path)
    t3 = time.perf_counter()
    print(f"\nsimulate {t1 - t0:.1f} s, run --cluster slurm {t2 - t1:.1f} s, run --cluster local {t3 - t2:.1f} s")

    # the SLURM run really ran on SLURM jobs: two worker jobs wrote logs, and they joined the scheduler
    assert "slurm: requested 2 jobs" in r.stderr
    errs = sorted(logs.glob("cryodask-worker-*.err"))
    assert len(errs) == 2, errs
    assert all("Registered to" in e.read_text() for e in errs)
    # and it cleaned up after itself: no worker job left in the queue
    for _ in range(150):
        if not _our_jobs():
            break
        time.sleep(0.2)
    assert _our_jobs() == []

    slurm_out, local_out = tmp_path / "out_slurm", tmp_path / "out_local"
    res_s, res_l = _stage_results(slurm_out), _stage_results(local_out)
    assert {"ingest", "preprocess"} <= set(res_s)
    assert res_s == res_l
    assert res_s["ingest"]["n_micrographs"] == 4

    arr_s, arr_l = _zarr_arrays(slurm_out / "store.zarr"), _zarr_arrays(local_out / "store.zarr")
    assert {"micrographs/image", "preprocessed/image"} <= set(arr_s)
    assert sorted(arr_s) == sorted(arr_l)
    for name in arr_s:
        a, b = arr_s[name], arr_l[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if a.dtype.kind == "f":
            assert np.isfinite(a).all(), name
        np.testing.assert_array_equal(a, b, err_msg=name)  # same seeded graph → identical numbers
    assert float(np.std(arr_s["preprocessed/image"])) > 0  # not trivially equal

    oth_s, oth_l = _other_outputs(slurm_out), _other_outputs(local_out)
    assert sorted(oth_s) == sorted(oth_l)
    for name, v in oth_s.items():
        if isinstance(v, str):
            assert v == oth_l[name], name
        else:
            np.testing.assert_array_equal(v, oth_l[name], err_msg=name)
