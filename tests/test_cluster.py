"""Cluster configuration and deployers (cryodask/cluster.py): settings validation, a real local
cluster, the cuda/kubernetes error messages, and the SLURM job script (dry run, no SLURM needed)."""
from __future__ import annotations

import re
import sys

import numpy as np
import pytest

from cryodask.cli import main
from cryodask.cluster import ClusterConfig, client_for, make_cluster, slurm_job_script
from cryodask.errors import CryodaskError


# --------------------------------------------------------------------------------------------
# configuration
def test_from_dict_unknown_key_is_an_error():
    with pytest.raises(CryodaskError, match="unknown cluster setting.*corez"):
        ClusterConfig.from_dict({"kind": "slurm", "corez": 4})


def test_from_dict_aliases_and_dashes():
    cfg = ClusterConfig.from_dict({"kind": "slurm", "partition": "gpu", "job-extra-directives": "--qos=x",
                                   "log-directory": "logs", "cores": 4, "memory": "16GB"})
    assert (cfg.kind, cfg.queue, cfg.cores, cfg.memory) == ("slurm", "gpu", 4, "16GB")
    assert cfg.job_extra_directives == ["--qos=x"]  # a single string becomes a one-line list
    assert cfg.log_directory == "logs"
    assert ClusterConfig.from_dict(None) == ClusterConfig()


@pytest.mark.parametrize("bad, match", [
    ({"kind": "pbs"}, "unknown cluster kind 'pbs'"),
    ({"cores": "two"}, "cores must be a whole number"),
    ({"jobs": -1}, "jobs must be a whole number"),
    ({"gpus": True}, "gpus must be a whole number"),
    ({"memory": "lots"}, "memory='lots' is not a size"),
    ({"adapt_min": 5, "adapt_max": 2}, "adapt_min=5 > adapt_max=2"),
    ({"job_extra_directives": [1, 2]}, "list of strings"),
])
def test_from_dict_rejects_bad_values(bad, match):
    with pytest.raises(CryodaskError, match=match):
        ClusterConfig.from_dict(bad)


# --------------------------------------------------------------------------------------------
# local cluster: starts, computes, limits threads, shuts down
def test_local_cluster_computes_and_limits_threads():
    import dask.array as da

    x = np.random.default_rng(0).normal(size=(300, 200))
    with client_for(ClusterConfig(n_workers=1, dashboard_address=":0"), announce=lambda m: None) as client:
        assert len(client.scheduler_info()["workers"]) == 1
        y = da.from_array(x, chunks=(100, 100))
        got = client.compute((y @ y.T).sum()).result()
        # every worker process was set up: one torch thread, one OpenCV thread
        torch_threads = client.run(lambda: __import__("torch").get_num_threads())
        cv_threads = client.run(lambda: __import__("cv2").getNumThreads())
        cluster = client.cluster
    assert got == pytest.approx(float((x @ x.T).sum()), rel=1e-10)
    assert set(torch_threads.values()) == {1} and set(cv_threads.values()) == {1}
    assert client.status == "closed" and cluster.status.name == "closed"


def test_client_for_shuts_down_after_an_error():
    with pytest.raises(RuntimeError, match="boom"):
        with client_for(ClusterConfig(n_workers=1, processes=False, dashboard_address=":0"),
                        announce=lambda m: None) as client:
            cluster = client.cluster
            raise RuntimeError("boom")
    assert client.status == "closed" and cluster.status.name == "closed"


def test_scheduler_address_connects_and_leaves_cluster_running():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as ext:
        cfg = ClusterConfig.from_dict({"scheduler_address": ext.scheduler_address})
        with client_for(cfg, announce=lambda m: None) as client:
            assert client.submit(lambda a: a + 1, 41).result() == 42
        assert ext.status.name == "running"
        assert len(ext.scheduler.workers) == 1


def test_unreachable_scheduler_address_is_a_clear_error():
    cfg = ClusterConfig(scheduler_address="tcp://127.0.0.1:9", startup_timeout=1)
    with pytest.raises(CryodaskError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        with client_for(cfg, announce=lambda m: None):
            pass


# --------------------------------------------------------------------------------------------
# cuda / kubernetes: clear one-line messages when they cannot work here
def _tiny_mrc(path):
    import mrcfile

    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.zeros((64, 64), np.float32))
        m.voxel_size = 2.0
    return path


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_has_cuda(), reason="this machine has a CUDA GPU")
def test_cuda_without_gpu_is_one_line_exit_2(tmp_path, capsys):
    mrc = _tiny_mrc(tmp_path / "m.mrc")
    rc = main(["run", "--micrographs", str(mrc), "--diameter", "100", "--out", str(tmp_path / "o"),
               "--cluster", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("cryodask run: error: --cluster cuda: no CUDA GPU")
    with pytest.raises(CryodaskError, match="no CUDA GPU is visible"):
        make_cluster(ClusterConfig(kind="cuda"))


def test_kubernetes_without_dask_kubernetes(monkeypatch, tmp_path, capsys):
    # make `import dask_kubernetes` fail even where it is installed
    for mod in [m for m in sys.modules if m == "dask_kubernetes" or m.startswith("dask_kubernetes.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "dask_kubernetes", None)
    with pytest.raises(CryodaskError, match=re.escape("pip install 'cryodask[k8s]'")):
        make_cluster(ClusterConfig(kind="kubernetes"))
    mrc = _tiny_mrc(tmp_path / "m.mrc")
    rc = main(["run", "--micrographs", str(mrc), "--diameter", "100", "--out", str(tmp_path / "o"),
               "--cluster", "kubernetes"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "dask-kubernetes" in err[-1] and "Traceback" not in "\n".join(err)


def test_kubernetes_missing_cluster_spec_names_the_file(tmp_path):
    from cryodask.errors import InputError

    with pytest.raises(InputError, match="nope.yaml: no such DaskCluster manifest"):
        make_cluster(ClusterConfig(kind="kubernetes", cluster_spec=str(tmp_path / "nope.yaml")))


def test_kubernetes_pod_resources():
    from cryodask.cluster import _kubernetes_kwargs

    kw = _kubernetes_kwargs(ClusterConfig(kind="kubernetes", cores=4, memory="16GB", gpus=1, image="reg/cd:1",
                                          env={"FOO": "bar"}))
    assert kw["image"] == "reg/cd:1" and kw["name"] == "cryodask"
    assert kw["resources"]["limits"] == {"cpu": "4", "memory": "16GB", "nvidia.com/gpu": "1"}
    assert kw["resources"]["requests"]["memory"] == "16GB"
    assert kw["worker_command"][:3] == ["dask", "cuda", "worker"]
    assert kw["env"]["OMP_NUM_THREADS"] == "1" and kw["env"]["FOO"] == "bar"
    cpu = _kubernetes_kwargs(ClusterConfig(kind="kubernetes"))
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert cpu["worker_command"][:2] == ["dask", "worker"] and "cryodask.cluster" in cpu["worker_command"]


# --------------------------------------------------------------------------------------------
# SLURM job script (dry run: nothing submitted)
def _directives(script: str) -> list[str]:
    return [ln[len("#SBATCH"):].strip() for ln in script.splitlines() if ln.startswith("#SBATCH")]


def test_slurm_job_script_minimal_has_no_empty_directives():
    pytest.importorskip("dask_jobqueue")
    script = slurm_job_script(ClusterConfig(kind="slurm", cores=1, memory="2GiB"))
    d = _directives(script)
    assert all(x and "None" not in x for x in d), d
    assert not any(x.startswith(("-p ", "-A ", "--gres")) for x in d)  # queue/account/gpus unset
    assert "--cpus-per-task=1" in d and "--mem=2G" in d and "-n 1" in d
    assert f"{sys.executable} -m distributed.cli.dask_worker" in script
    assert "--preload cryodask.cluster" in script and "--nthreads 1" in script
    assert "export OMP_NUM_THREADS=1" in script


def test_slurm_job_script_full():
    pytest.importorskip("dask_jobqueue")
    cfg = ClusterConfig.from_dict({
        "kind": "slurm", "cores": 8, "memory": "32GiB", "walltime": "02:00:00", "partition": "gpu",
        "account": "cryo", "gpus": 1, "job_extra_directives": ["--qos=high", "--constraint=a100"],
        "job_script_prologue": ["module load cuda/12"], "interface": "ib0", "log_directory": "/tmp/cd-logs",
        "env": {"CRYODASK_X": "a b"}})
    script = slurm_job_script(cfg)
    d = _directives(script)
    for want in ["-p gpu", "-A cryo", "-t 02:00:00", "--mem=32G", "--cpus-per-task=8", "--gres=gpu:1",
                 "--qos=high", "--constraint=a100", "-J cryodask-worker",
                 "-o /tmp/cd-logs/cryodask-worker-%J.out", "-e /tmp/cd-logs/cryodask-worker-%J.err"]:
        assert want in d, (want, d)
    assert "--nthreads 1" in script and "--nworkers" not in script  # one worker for the one GPU
    assert "--interface ib0" in script
    assert "module load cuda/12" in script and "export CRYODASK_X='a b'" in script
    # CPU job: one single-threaded worker process per core
    cpu = slurm_job_script(ClusterConfig(kind="slurm", cores=4, memory="8GB"))
    assert "--nworkers 4" in cpu and "--nthreads 1" in cpu and "--gres" not in cpu
    with pytest.raises(CryodaskError, match="gpus: 1 per job"):
        slurm_job_script(ClusterConfig(kind="slurm", gpus=2))


def test_slurm_falls_back_to_dask_jobqueue_config():
    pytest.importorskip("dask_jobqueue")
    import dask

    with dask.config.set({"jobqueue.slurm.cores": 2, "jobqueue.slurm.memory": "6GiB",
                          "jobqueue.slurm.queue": "site-default", "jobqueue.slurm.walltime": "04:00:00",
                          "jobqueue.slurm.job-extra-directives": ["--qos=site"]}):
        d = _directives(slurm_job_script(ClusterConfig(kind="slurm")))
        assert {"-p site-default", "--cpus-per-task=2", "--mem=6G", "-t 04:00:00", "--qos=site"} <= set(d)
        # the run configuration wins over the site configuration
        d = _directives(slurm_job_script(ClusterConfig(kind="slurm", queue="mine", cores=1,
                                                       job_extra_directives=["--qos=mine"])))
        assert "-p mine" in d and "--cpus-per-task=1" in d and "--qos=mine" in d and "--qos=site" not in d


def test_slurm_without_sbatch_is_a_clear_error(monkeypatch):
    pytest.importorskip("dask_jobqueue")
    import cryodask.cluster as cl

    monkeypatch.setattr(cl.shutil, "which", lambda name: None)
    with pytest.raises(CryodaskError, match="sbatch command is not found"):
        make_cluster(ClusterConfig(kind="slurm", dashboard_address=":0"))


def test_kubernetes_cluster_spec():
    pytest.importorskip("dask_kubernetes")
    from cryodask.cluster import kubernetes_cluster_spec

    spec = kubernetes_cluster_spec(ClusterConfig(kind="kubernetes", image="reg/cd:1", cores=2, memory="8Gi", jobs=3))
    assert spec["kind"] == "DaskCluster" and spec["metadata"]["name"] == "cryodask"
    worker = spec["spec"]["worker"]
    assert worker["replicas"] == 3
    container = worker["spec"]["containers"][0]
    assert container["image"] == "reg/cd:1"
    assert container["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    assert container["args"][:2] == ["dask", "worker"] and "cryodask.cluster" in container["args"]


def test_worker_saturation_reaches_the_scheduler():
    import dask
    import distributed  # noqa: F401 - loads its configuration defaults

    default = dask.config.get("distributed.scheduler.worker-saturation")
    for value, expected in ((None, default), (1.0, 1.0), (2.5, 2.5)):
        cluster = make_cluster(ClusterConfig(kind="local", n_workers=1, processes=False, dashboard_address=":0",
                                             worker_saturation=value))
        try:
            assert cluster.scheduler.WORKER_SATURATION == expected
        finally:
            cluster.close()
    assert dask.config.get("distributed.scheduler.worker-saturation") == default  # not changed for others
    for bad in (0, -1.0, "high", True):
        with pytest.raises(CryodaskError, match="worker_saturation must be a number > 0"):
            ClusterConfig(worker_saturation=bad)


def _child_peak(q):
    from cryodask.runtime import peak_rss_mib

    q.put(peak_rss_mib())


def test_peak_rss_of_a_spawned_process_is_its_own():
    """Workers are spawned (fork + exec): their peak must not be the parent's (ru_maxrss would be)."""
    import multiprocessing as mp

    import numpy as np

    from cryodask.runtime import peak_rss_mib

    big = np.ones(50_000_000)  # 400 MB in this process
    assert peak_rss_mib() > 380
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_peak, args=(q,))
    p.start()
    child = q.get(timeout=120)
    p.join()
    del big
    assert 5 < child < 300


def _heap_use_of_4mb_array() -> tuple[int, int]:
    """(mmap-ed blocks that one 4 MB array adds while it lives, free bytes glibc keeps at the top
    of the heap once it is freed): glibc's ``mallinfo2`` ``hblks`` and ``keepcost``."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    f = ctypes.CDLL("libc.so.6").mallinfo2
    f.restype = MallInfo2
    before = f().hblks
    a = np.ones(1 << 20, np.float32)
    after = f().hblks
    del a
    return int(after - before), int(f().keepcost)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_workers_keep_kernel_temporaries_in_the_heap():
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_, which makes glibc mmap every array > 128 kB (a
    page-faulted, zeroed mapping per temporary); cryodask's worker set-up raises the mmap
    threshold so a 4 MB temporary comes from the heap, and the trim threshold so its freed pages
    are kept for the next one rather than handed back and faulted in again."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("no glibc mallinfo2")
    with client_for(ClusterConfig(n_workers=1, dashboard_address=":0"), announce=lambda m: None) as client:
        env = client.run(lambda: __import__("os").environ.get("MALLOC_TRIM_THRESHOLD_"))
        use = list(client.run(_heap_use_of_4mb_array).values())
    assert set(env.values()) == {"65536"}  # Dask's variable is still there
    assert [m for m, _ in use] == [0]  # the array came from the heap ...
    assert use[0][1] >= 4 << 20  # ... and its pages stay there for the next temporary
    # the same process without the set-up maps it (what every worker did before)
    import os
    import subprocess
    from pathlib import Path

    code = ("import sys; sys.path.insert(0, %r); import tests.test_cluster as t; "
            "print(t._heap_use_of_4mb_array()[0])") % str(Path(__file__).parents[1])
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"},
                         capture_output=True, text=True, check=True).stdout
    assert int(out.strip()) == 1


# --------------------------------------------------------------------------------------------
def _worker_address():
    from distributed import get_worker

    return get_worker().address


def _caller_and_beside(x):
    """A task that hands half its work to run_beside: (own result, beside result, own worker,
    beside worker)."""
    from cryodask.runtime import run_beside

    other = run_beside(lambda v: (v * 3, _worker_address()), x)
    mine = (x * 2, _worker_address())
    theirs = other()
    return mine[0], theirs[0], mine[1], theirs[1]


def test_run_beside_runs_on_a_free_worker_or_in_place():
    from cryodask.pick import _split_holds
    from cryodask.runtime import run_beside

    # outside a worker nothing starts until the result is asked for
    calls = []
    res = run_beside(lambda v: calls.append(v) or v + 1, 4)
    assert calls == []
    assert res() == 5 and calls == [4]
    # the held-out test of a two-view split, whose second fold runs beside the first
    rng = np.random.default_rng(3)
    Z = rng.normal(size=(600, 40)).astype(np.float32)
    y = rng.random(600) < 0.4
    Z[y, :5] += 2.5
    one_view = Z.copy()
    one_view[:, :5] = rng.normal(size=(600, 5))
    local = [_split_holds(z, y, 5) for z in (Z, one_view)]
    assert local == [True, False]
    for n in (1, 2):  # one worker: the caller frees its slot while it waits (no deadlock)
        with client_for(ClusterConfig(n_workers=n, dashboard_address=":0"), announce=lambda m: None) as client:
            mine, theirs, w_mine, w_theirs = client.submit(_caller_and_beside, 7, pure=False).result(timeout=60)
            on_cluster = [client.submit(_split_holds, z, y, 5, pure=False).result(timeout=60) for z in (Z, one_view)]
        assert (mine, theirs) == (14, 21)
        assert (w_mine == w_theirs) == (n == 1)  # with two workers the idle one takes it
        assert on_cluster == local


def test_housekeeping_rates_reach_workers_and_scheduler_unless_the_user_set_them():
    import dask
    from distributed import Client

    def worker_rates(dask_worker):
        cb = dask_worker.periodic_callbacks
        return cb["profile"].callback_time, cb["tick"].callback_time

    def scheduler_tick(dask_scheduler):
        return dask_scheduler.periodic_callbacks["tick"].callback_time

    # Dask's defaults (10 ms profile samples, 20 ms ticks) → cryodask's coarser rates, in the
    # worker processes (their configuration travels from this process) and the scheduler
    with make_cluster(ClusterConfig(kind="local", n_workers=1, processes=True, dashboard_address=":0")) as cluster, \
            Client(cluster) as client:
        assert list(client.run(worker_rates).values()) == [(100.0, 100.0)]
        assert client.run_on_scheduler(scheduler_tick) == 100.0
    assert dask.config.get("distributed.worker.profile.interval") == "10ms"  # not changed for others
    # a user's own setting wins
    with dask.config.set({"distributed.worker.profile.interval": "30ms"}):
        cluster = make_cluster(ClusterConfig(kind="local", n_workers=1, processes=False, dashboard_address=":0"))
        try:
            worker = next(iter(cluster.workers.values()))
            assert worker.periodic_callbacks["profile"].callback_time == 30.0
            assert worker.periodic_callbacks["tick"].callback_time == 100.0
        finally:
            cluster.close()
