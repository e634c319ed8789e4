"""Worker loss: SIGKILL of one worker process of a 2-worker LocalCluster in the middle of a run
does not fail the job (Dask recomputes the lost tasks on the nanny's replacement or the other
worker) and the outputs equal an uninterrupted run's."""
from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

STAGES = ["ingest", "preprocess", "ctf", "pick", "extract", "align2d"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    import dask

    from cryodask.simulate_job import SimulationConfig, run_simulation

    root = tmp_path_factory.mktemp("workerloss")
    with dask.config.set(scheduler="threads"):
        run_simulation(SimulationConfig(volume="apoferritin", out=str(root / "sim"), n_micrographs=4,
                                        micrograph_size=512, pixel_size=3.0, seed=31))
    return root


def _checksums(out: Path) -> dict[str, str]:
    import zarr

    sums: dict[str, str] = {}

    def walk(group, prefix):
        for name, arr in group.arrays():
            a = np.asarray(arr[...])
            data = "\x00".join(map(str, a.ravel().tolist())).encode() if a.dtype.kind in "OTU" else a.tobytes()
            sums[f"{prefix}/{name}"] = hashlib.sha256(data).hexdigest()
        for name, sub in group.groups():
            walk(sub, f"{prefix}/{name}")

    for store in sorted(out.rglob("*.zarr")):
        walk(zarr.open_group(str(store), mode="r"), store.relative_to(out).as_posix())
    for f in sorted(list(out.rglob("*.star")) + list(out.rglob("*.csv"))):
        sums[f.relative_to(out).as_posix()] = hashlib.sha256(f.read_text().replace(str(out), "OUT").encode()).hexdigest()
    return sums


def test_killing_a_worker_mid_run_does_not_fail_or_change_the_result(sim):
    from cryodask.cluster import ClusterConfig, client_for
    from cryodask.pipeline import RunConfig, run_pipeline

    def cfg(out: str) -> RunConfig:
        return RunConfig.load(None, overrides={"micrographs": [str(sim / "sim" / "micrographs" / "*.mrc")],
                                               "pixel_size": 3.0, "diameter": 120.0, "seed": 2,
                                               "out": str(sim / out), "stages": STAGES})

    ccfg = ClusterConfig(n_workers=2, processes=True, dashboard_address=":0")
    with client_for(ccfg, announce=lambda m: None) as client:
        run_pipeline(cfg("ref"), None)  # uninterrupted, on the same cluster
        pids = client.run(os.getpid)
        assert len(pids) == 2

        box: dict = {}

        def target():
            try:
                box["report"] = run_pipeline(cfg("killed"), None)
            except BaseException as e:  # noqa: BLE001 - reported below
                box["error"] = e

        t = threading.Thread(target=target)
        t.start()
        log = sim / "killed" / "run.log"
        victim = None
        t0 = time.monotonic()
        # kill a worker while it is running tasks of the CTF stage (one task per micrograph)
        while t.is_alive() and time.monotonic() - t0 < 300:
            if log.exists() and "computing: CTF estimation" in log.read_text():
                busy = {w: ks for w, ks in client.processing().items() if ks}
                if busy:
                    victim = sorted(busy)[0]
                    os.kill(pids[victim], signal.SIGKILL)
                    break
            time.sleep(0.01)
        assert victim is not None, "the run finished before a worker could be killed mid-stage"
        assert "stage ctf: done" not in log.read_text()
        t.join(timeout=600)
        assert not t.is_alive()
        assert "error" not in box, f"the run failed after a worker was killed: {box.get('error')!r}"
        # the nanny started a replacement process
        assert pids[victim] not in client.run(os.getpid).values()

    ref, got = _checksums(sim / "ref"), _checksums(sim / "killed")
    assert sorted(got) == sorted(ref) and len(ref) > 10
    assert [k for k in ref if got[k] != ref[k]] == []
    rep = box["report"]
    assert set(rep["stages"]) == set(STAGES) and not any(v.get("resumed") for v in rep["stages"].values())
