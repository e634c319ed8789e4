"""Dask clusters from configuration, through the ecosystem's own deployers.

``local`` (default): :class:`distributed.LocalCluster` on this machine. ``cuda``:
:class:`dask_cuda.LocalCUDACluster`, one worker per GPU. ``slurm``:
:class:`dask_jobqueue.SLURMCluster`, workers are SLURM jobs. ``kubernetes``:
:class:`dask_kubernetes.operator.KubeCluster`, workers are pods of a ``DaskCluster`` resource.
With ``scheduler_address`` set, cryodask connects to a Dask cluster that is already running
(e.g. one from the dask/dask Helm chart) instead of starting one.

No home-made scheduler or job runner: cryodask only chooses the deployer and its resources, and
every stage runs on the one ``distributed.Client`` that :func:`client_for` yields. On exit the
cluster is shut down (SLURM jobs cancelled, Kubernetes resources deleted) even after an error
or Ctrl-C.

Settings left unset (``None``) for SLURM fall back to dask-jobqueue's own configuration
(``jobqueue.slurm.*`` in ``~/.config/dask/jobqueue.yaml`` or ``$DASK_CONFIG``), so a site's admins
can provide defaults; see ``deploy/slurm/``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, fields
from typing import Any, Iterator

from .errors import CryodaskError

log = logging.getLogger("cryodask")

__all__ = ["ClusterConfig", "make_cluster", "client_for", "limit_threads", "tune_malloc", "worker_setup",
           "slurm_job_script", "kubernetes_cluster_spec", "KINDS"]

KINDS = ("local", "cuda", "slurm", "kubernetes")

# cryodask's own defaults for a batch job when neither the run configuration nor dask-jobqueue's
# configuration sets them
_SLURM_DEFAULT_CORES = 1
_SLURM_DEFAULT_MEMORY = "4GB"
_ALIASES = {"partition": "queue", "workers": "n_workers", "dashboard": "dashboard_address"}


@dataclass
class ClusterConfig:
    """Cluster settings (the ``cluster:`` section of a run configuration; keys may use ``-`` or ``_``).

    Common:
      kind: local | cuda | slurm | kubernetes.
      n_workers: local/cuda: worker processes (default one per CPU core / per GPU); slurm and
        kubernetes: workers to start (overrides ``jobs``).
      threads_per_worker: threads per worker process (default 1: torch and OpenCV each use one
        thread per task, so cores are used by processes, not threads).
      dashboard_address: where the scheduler serves the dashboard (``":0"`` = any free port).
      local_directory: scratch space of the workers (spilled data).
      scheduler_address: connect to this running scheduler (``tcp://host:8786``) instead of
        starting a cluster; it is left running afterwards.
      startup_timeout: seconds to wait for the first worker before giving up with a message
        (default: no wait for local; for slurm/kubernetes compute simply waits for the queue).
      worker_saturation: the scheduler's ``distributed.scheduler.worker-saturation`` (tasks queued
        per worker thread) for the schedulers cryodask starts (local, cuda, slurm). Default 1.0:
        each worker holds one task at a time, so at the end of a stage of a few long tasks no
        worker runs two back to back while another is idle (Dask's default, 1.1, rounds up to
        two per single-threaded worker). ``None`` keeps Dask's configuration.
    local: ``processes=False`` runs the workers as threads of this process (fast start-up);
      ``memory_limit`` per worker (``"auto"``: the machine's memory shared out).
    slurm (one SLURM job = ``cores // threads_per_worker`` worker processes):
      cores (CPUs per job), memory (per job, e.g. ``"16GB"``), walltime (``HH:MM:SS``),
      queue (alias ``partition``), account, gpus (per job → ``--gres=gpu:N``; one worker per GPU,
      so at most 1), job_extra_directives (more ``#SBATCH`` lines, e.g. ``["--qos=normal"]``),
      job_script_prologue (shell lines run before the worker, e.g. ``module load cuda``),
      interface (network interface of scheduler and workers, e.g. ``ib0``; ``lo`` for one machine),
      log_directory (worker job logs), python (the workers' interpreter, or a command that runs it,
      e.g. ``apptainer exec cryodask.sif python``; default: this one), worker_extra_args (more
      ``dask worker`` options, e.g. ``["--lifetime", "55m", "--lifetime-stagger", "4m"]`` so workers
      retire before the walltime and adaptive scaling replaces them),
      jobs (fixed number of jobs) or adapt_min/adapt_max (adaptive scaling, in jobs),
      check_submit (ask ``sbatch --test-only`` whether SLURM accepts the job before submitting).
    kubernetes: image, namespace, name (of the DaskCluster resource), cores/memory/gpus per worker
      pod, jobs (= worker pods) or adapt_min/adapt_max, env (extra environment of the pods);
      or cluster_spec: path of a complete ``DaskCluster`` manifest (volumes, node selectors, …)
      used instead of the generated one (see deploy/kubernetes/).
    """

    kind: str = "local"
    n_workers: int | None = None
    threads_per_worker: int = 1
    processes: bool = True
    memory_limit: str | None = "auto"
    dashboard_address: str = ":8787"
    local_directory: str | None = None
    scheduler_address: str | None = None
    startup_timeout: float | None = None
    worker_saturation: float | None = 1.0
    # batch systems
    cores: int | None = None
    memory: str | None = None
    walltime: str | None = None
    queue: str | None = None
    account: str | None = None
    gpus: int = 0
    job_extra_directives: list[str] = field(default_factory=list)
    job_script_prologue: list[str] = field(default_factory=list)
    interface: str | None = None
    jobs: int = 2
    adapt_min: int | None = None
    adapt_max: int | None = None
    log_directory: str | None = None
    python: str | None = None
    worker_extra_args: list[str] = field(default_factory=list)
    check_submit: bool = True
    # kubernetes
    image: str = "ghcr.io/cryodask/cryodask:latest"
    namespace: str | None = None
    name: str = "cryodask"
    env: dict[str, str] = field(default_factory=dict)
    cluster_spec: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ClusterConfig":
        """From the ``cluster:`` mapping of a run configuration; unknown keys are an error."""
        if d is not None and not isinstance(d, dict):
            raise CryodaskError(f"the cluster settings must be a mapping, not {type(d).__name__}")
        norm: dict[str, Any] = {}
        for k, v in (d or {}).items():
            key = str(k).replace("-", "_")
            norm[_ALIASES.get(key, key)] = v
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(norm) - known)
        if unknown:
            raise CryodaskError(f"unknown cluster setting(s): {', '.join(unknown)} "
                                f"(known: {', '.join(sorted(known))})")
        return cls(**norm)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CryodaskError(f"unknown cluster kind {self.kind!r}: use {', '.join(KINDS)}")
        for name in ("n_workers", "cores", "jobs", "adapt_min", "adapt_max", "gpus", "threads_per_worker"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise CryodaskError(f"cluster setting {name} must be a whole number ≥ 0, got {v!r}")
        if self.threads_per_worker < 1:
            raise CryodaskError("cluster setting threads_per_worker must be ≥ 1")
        ws = self.worker_saturation
        if ws is not None and (isinstance(ws, bool) or not isinstance(ws, (int, float)) or not ws > 0):
            raise CryodaskError(f"cluster setting worker_saturation must be a number > 0 (or null), got {ws!r}")
        for name in ("job_extra_directives", "job_script_prologue", "worker_extra_args"):
            v = getattr(self, name)
            if isinstance(v, str):
                setattr(self, name, [v])
            elif not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise CryodaskError(f"cluster setting {name} must be a list of strings, got {v!r}")
        if not isinstance(self.env, dict):
            raise CryodaskError(f"cluster setting env must be a mapping of names to values, got {self.env!r}")
        if self.memory is not None:
            from dask.utils import parse_bytes

            try:
                parse_bytes(str(self.memory))
            except ValueError:
                raise CryodaskError(f"cluster setting memory={self.memory!r} is not a size like '4GB'") from None
        if self.adapt_max is not None and self.adapt_min is not None and self.adapt_min > self.adapt_max:
            raise CryodaskError(f"cluster settings: adapt_min={self.adapt_min} > adapt_max={self.adapt_max}")


# --------------------------------------------------------------------------------------------
# worker set-up
def limit_threads() -> None:
    """Worker set-up: one thread each for torch and OpenCV (they would oversubscribe cores).

    Dask already gives worker processes ``OMP_NUM_THREADS=1``; torch follows it, OpenCV does
    not. Runs on every worker through a WorkerPlugin (and ``--preload cryodask.cluster``)."""
    try:
        import torch

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    except Exception:  # pragma: no cover - torch is a dependency, but never fail a worker start
        pass
    try:
        import cv2

        cv2.setNumThreads(1)
    except Exception:  # pragma: no cover
        pass


#: glibc's ``M_MMAP_THRESHOLD`` for worker processes (bytes): allocations below it come from the
#: heap and are reused, allocations above it are mapped and unmapped each time
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
#: glibc's ``M_TRIM_THRESHOLD`` for worker processes (bytes): free memory at the top of the heap
#: up to this much is kept for the next temporaries (glibc's own rule: twice the mmap threshold)
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES


def tune_malloc(threshold: int = MMAP_THRESHOLD_BYTES, trim: int = TRIM_THRESHOLD_BYTES) -> bool:
    """Worker set-up: keep the kernels' temporaries (0.1–30 MB arrays) in glibc's heap.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` so that freed memory goes
    back to the system. Setting that variable also switches off glibc's adaptive thresholds:
    every array above 128 kB is then a fresh ``mmap`` and ``munmap``, and each of its pages is
    faulted in and zeroed by the kernel. Measured on a 2-core VM (one process, 8 micrographs of
    1024² px): CTF estimation took 2.6× as long with it, picking 1.4×, particle features 1.2×.
    Fixing the mmap threshold at 32 MB (glibc's own adaptive ceiling) brings the temporaries
    into the heap; the trim threshold must then rise too (to 64 MB, where glibc's adaptive rule
    would take it), or each freed temporary at the top of the heap is handed back and faulted
    in again by the next: with 64 kB, picking took 1.2× and preprocessing 1.16× as long as with
    64 MB. Memory still goes back to the system: picking and the store writes trim explicitly
    (:func:`cryodask.runtime.release_freed_memory`), and at most ``trim`` bytes of free heap top
    are kept in between. Left alone when ``MALLOC_MMAP_THRESHOLD_`` is set in the environment or
    the C library is not glibc. Returns whether the thresholds were set."""
    from .runtime import glibc

    libc = glibc()
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, int(threshold))) and bool(libc.mallopt(m_trim_threshold, int(trim)))


def worker_setup() -> None:
    """What every worker runs once: :func:`limit_threads`, :func:`tune_malloc` and the import of
    zarr (every cryodask graph reads zarr stores: imported by the first task instead, its 139
    modules would hold up that worker's event loop at the start of the first stage)."""
    limit_threads()
    tune_malloc()
    try:
        import zarr  # noqa: F401
    except Exception:  # pragma: no cover - a dependency, but never fail a worker start
        pass


def _thread_limiter_cls():
    from distributed.diagnostics.plugin import WorkerPlugin

    class ThreadLimiter(WorkerPlugin):
        """Apply :func:`worker_setup` on every worker, including ones that join later."""

        name = "cryodask-threads"

        def setup(self, worker):
            worker_setup()

    return ThreadLimiter


def _ThreadLimiter():  # noqa: N802 - factory so distributed is imported lazily
    return _thread_limiter_cls()()


# ``dask worker --preload cryodask.cluster`` runs this on workers started outside cryodask
def dask_setup(worker=None):  # pragma: no cover - exercised on batch-system workers
    worker_setup()


_WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


# --------------------------------------------------------------------------------------------
# deployers
def _local(cfg: ClusterConfig):
    from distributed import LocalCluster

    n = cfg.n_workers or max(1, (os.cpu_count() or 1) // max(1, cfg.threads_per_worker))
    return LocalCluster(
        n_workers=n,
        threads_per_worker=cfg.threads_per_worker,
        processes=cfg.processes,
        memory_limit=cfg.memory_limit if cfg.processes else None,
        dashboard_address=cfg.dashboard_address,
        local_directory=cfg.local_directory,
    )


def _cuda(cfg: ClusterConfig):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a dependency
        has_gpu = False
    if not has_gpu:
        raise CryodaskError("--cluster cuda: no CUDA GPU is visible on this machine "
                            "(torch.cuda.is_available() is False); use --cluster local")
    try:
        from dask_cuda import LocalCUDACluster
    except Exception as e:  # ImportError, or CUDA bindings missing
        raise CryodaskError("--cluster cuda needs the GPU extra: pip install 'cryodask[gpu]' "
                            f"(import dask_cuda failed: {type(e).__name__}: {e})") from None
    try:
        kw: dict[str, Any] = dict(dashboard_address=cfg.dashboard_address, local_directory=cfg.local_directory,
                                  threads_per_worker=cfg.threads_per_worker)
        if cfg.n_workers:
            kw["n_workers"] = cfg.n_workers
        if cfg.memory_limit is not None:
            kw["memory_limit"] = cfg.memory_limit
        return LocalCUDACluster(**kw)
    except Exception as e:  # e.g. pynvml.NVMLError_LibraryNotFound without a driver
        raise CryodaskError(f"--cluster cuda: no usable GPU ({type(e).__name__}: {e})") from None


def _jobqueue_config(key: str, default=None):
    import dask

    return dask.config.get(f"jobqueue.slurm.{key}", default=default)


def _slurm_job_kwargs(cfg: ClusterConfig) -> dict[str, Any]:
    """Keyword arguments of ``SLURMCluster``/``SLURMJob`` for ``cfg`` (dask-jobqueue 0.9).

    Only what is set is passed, so dask-jobqueue's configuration provides the rest; optional
    ``#SBATCH`` directives are never emitted empty."""
    cores = cfg.cores or _jobqueue_config("cores") or _SLURM_DEFAULT_CORES
    memory = cfg.memory or _jobqueue_config("memory") or _SLURM_DEFAULT_MEMORY
    if cfg.gpus > 1:
        raise CryodaskError(f"cluster setting gpus={cfg.gpus}: cryodask runs one Dask worker per GPU, so ask "
                            "for gpus: 1 per job and more jobs (jobs: N or adapt_max: N)")
    tpw = max(1, cfg.threads_per_worker)
    if cfg.gpus:
        processes, threads = 1, tpw  # one worker per GPU; the job may still hold more CPUs
    else:
        processes, threads = max(1, int(cores) // tpw), tpw
    kw: dict[str, Any] = dict(
        cores=processes * threads, processes=processes, memory=memory,
        python=cfg.python or sys.executable,
        worker_extra_args=(list(cfg.worker_extra_args) or list(_jobqueue_config("worker-extra-args") or []))
        + ["--preload", "cryodask.cluster"],
        job_name="cryodask-worker",
    )
    if processes * threads != int(cores):
        kw["job_cpu"] = int(cores)  # --cpus-per-task stays what was asked for
    extra = list(cfg.job_extra_directives) or list(_jobqueue_config("job-extra-directives") or [])
    if cfg.gpus:
        extra.append(f"--gres=gpu:{cfg.gpus}")
    if extra:
        kw["job_extra_directives"] = extra
    prologue = list(cfg.job_script_prologue) or list(_jobqueue_config("job-script-prologue") or [])
    env_lines = [f"export {k}={shlex.quote(str(v))}" for k, v in {**_WORKER_ENV, **cfg.env}.items()]
    kw["job_script_prologue"] = env_lines + prologue
    for key in ("walltime", "queue", "account", "interface", "log_directory", "local_directory"):
        v = getattr(cfg, key)
        if v:
            kw[key] = v
    if kw.get("log_directory"):
        kw["log_directory"] = os.path.abspath(os.path.expanduser(kw["log_directory"]))
    return kw


def slurm_job_script(cfg: ClusterConfig) -> str:
    """The SLURM batch script that ``--cluster slurm`` submits for each worker job (dry run:
    nothing is submitted, no scheduler is started). The scheduler address is a placeholder."""
    try:
        from dask_jobqueue.slurm import SLURMJob
    except ImportError:
        raise CryodaskError("--cluster slurm needs dask-jobqueue: pip install 'cryodask[cluster]'") from None
    kw = _slurm_job_kwargs(cfg)
    return SLURMJob(scheduler="tcp://<scheduler-address>:8786", name="<worker-name>", **kw).job_script()


def _check_slurm_submit(script: str) -> None:
    """Ask SLURM (``sbatch --test-only``) whether it would accept the worker job, so a request
    it can never satisfy fails now with SLURM's own words instead of waiting forever."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise CryodaskError("--cluster slurm: the sbatch command is not found; run on a SLURM login or "
                            "compute node (or use --cluster local)")
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
        f.write(script)
        path = f.name
    try:
        r = subprocess.run([sbatch, "--test-only", path], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        log.warning("sbatch --test-only did not answer in 60 s; submitting anyway")
        return
    finally:
        os.unlink(path)
    if r.returncode != 0:
        msg = " ".join((r.stderr or r.stdout).split()) or f"exit code {r.returncode}"
        raise CryodaskError(f"--cluster slurm: SLURM refuses the worker job ({msg}); check cores, memory, "
                            "walltime, queue and account in the cluster settings "
                            "(`cryodask cluster show-script` prints the job script)")


def _slurm(cfg: ClusterConfig):
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise CryodaskError("--cluster slurm needs dask-jobqueue: pip install 'cryodask[cluster]'") from None
    kw = _slurm_job_kwargs(cfg)
    if cfg.check_submit:
        _check_slurm_submit(slurm_job_script(cfg))
    sched = dict(_jobqueue_config("scheduler-options") or {})
    sched["dashboard_address"] = cfg.dashboard_address
    cluster = SLURMCluster(scheduler_options=sched, **kw)
    try:
        _scale(cfg, cluster, jobs_kw=True)
    except Exception:
        cluster.close()
        raise
    return cluster


def _scale(cfg: ClusterConfig, cluster, jobs_kw: bool) -> None:
    if cfg.n_workers:
        cluster.scale(n=cfg.n_workers)
    elif cfg.adapt_max:
        if jobs_kw:
            cluster.adapt(minimum_jobs=cfg.adapt_min or 0, maximum_jobs=cfg.adapt_max)
        else:
            cluster.adapt(minimum=cfg.adapt_min or 0, maximum=cfg.adapt_max)
    elif jobs_kw:
        cluster.scale(jobs=cfg.jobs)
    else:
        cluster.scale(cfg.jobs)


def _kubernetes_kwargs(cfg: ClusterConfig) -> dict[str, Any]:
    cpu = str(cfg.cores or 1)
    mem = str(cfg.memory or _SLURM_DEFAULT_MEMORY)
    res: dict[str, dict[str, str]] = {"requests": {"cpu": cpu, "memory": mem}, "limits": {"cpu": cpu, "memory": mem}}
    if cfg.gpus:
        res["limits"]["nvidia.com/gpu"] = str(cfg.gpus)
        res["requests"]["nvidia.com/gpu"] = str(cfg.gpus)
        worker = ["dask", "cuda", "worker"]  # dask-cuda: one worker per GPU of the pod
    else:
        worker = ["dask", "worker"]
    nthreads = cfg.threads_per_worker
    worker += ["--nthreads", str(nthreads), "--preload", "cryodask.cluster", *cfg.worker_extra_args]
    return dict(name=cfg.name, image=cfg.image, namespace=cfg.namespace, resources=res,
                env={**_WORKER_ENV, **{str(k): str(v) for k, v in cfg.env.items()}},
                worker_command=worker)


def kubernetes_cluster_spec(cfg: ClusterConfig) -> dict[str, Any]:
    """The ``DaskCluster`` resource (kubernetes.dask.org/v1) that ``--cluster kubernetes`` creates,
    as a dict (``yaml.safe_dump`` it for ``kubectl apply -f``). Needs dask-kubernetes."""
    try:
        from dask_kubernetes.operator import make_cluster_spec
    except ImportError:
        raise CryodaskError("--cluster kubernetes needs dask-kubernetes: pip install 'cryodask[k8s]'") from None
    kw = _kubernetes_kwargs(cfg)
    kw.pop("namespace")
    return make_cluster_spec(n_workers=cfg.n_workers or cfg.jobs, **kw)


def _kubernetes(cfg: ClusterConfig):
    spec = os.path.expanduser(cfg.cluster_spec) if cfg.cluster_spec else None
    if spec and not os.path.isfile(spec):
        from .errors import InputError

        raise InputError(spec, "no such DaskCluster manifest (cluster setting cluster_spec)")
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError:
        raise CryodaskError("--cluster kubernetes needs dask-kubernetes: pip install 'cryodask[k8s]'") from None
    if spec:
        kw: dict[str, Any] = dict(custom_cluster_spec=spec, namespace=cfg.namespace)
    else:
        kw = dict(_kubernetes_kwargs(cfg),
                  n_workers=0 if cfg.adapt_max and not cfg.n_workers else (cfg.n_workers or cfg.jobs))
    try:
        cluster = KubeCluster(**kw)
    except Exception as e:  # no kubeconfig, operator not installed, scheduler pod failed ...
        raise CryodaskError(f"--cluster kubernetes: could not create the Dask cluster "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    try:
        if cfg.adapt_max and not cfg.n_workers:
            cluster.adapt(minimum=cfg.adapt_min or 0, maximum=cfg.adapt_max)
        elif cfg.cluster_spec and cfg.n_workers:
            cluster.scale(cfg.n_workers)
    except Exception:
        cluster.close()
        raise
    return cluster


_DEPLOYERS = {"local": _local, "cuda": _cuda, "slurm": _slurm, "kubernetes": _kubernetes}


def make_cluster(cfg: ClusterConfig):
    """Build the cluster object for ``cfg.kind`` (workers requested; not yet connected to a client)."""
    try:
        deploy = _DEPLOYERS[cfg.kind]
    except KeyError:
        raise CryodaskError(f"unknown cluster kind {cfg.kind!r}: use {', '.join(KINDS)}") from None
    import dask

    # the scheduler reads this when it starts (local, cuda and slurm schedulers run in this
    # process; a Kubernetes scheduler pod has its own configuration)
    settings = dict(_housekeeping())
    if cfg.worker_saturation is not None:
        settings["distributed.scheduler.worker-saturation"] = float(cfg.worker_saturation)
    with dask.config.set(settings):
        return deploy(cfg)


#: Dask's defaults for its diagnostics' sampling (the worker's statistical profiler samples the
#: running task's stack every ``10ms``; every server measures its event loop's latency every
#: ``20ms``) and the coarser rates cryodask's clusters use: those callbacks run on the workers'
#: and the scheduler's event loops, which share the cores with the tasks. Measured on a 2-core
#: VM picking 24 micrographs with 2 workers: each worker's event-loop thread used 0.35 CPU-s of
#: a 4.1 s run with Dask's rates, 0.27 with these; idle, a worker's process used 3.8 % of a core
#: and the scheduler's 4 %. The dashboard's profile and event-loop pages still fill, at this
#: resolution.
HOUSEKEEPING = {"distributed.worker.profile.interval": ("10ms", "100ms"),
                "distributed.admin.tick.interval": ("20ms", "100ms")}


def _housekeeping() -> Iterator[tuple[str, str]]:
    """The :data:`HOUSEKEEPING` settings still at Dask's defaults (a user's own configuration
    wins)."""
    import dask

    for key, (default, ours) in HOUSEKEEPING.items():
        if str(dask.config.get(key, default)) == default:
            yield key, ours


def _wait_for_first_worker(client, cfg: ClusterConfig) -> None:
    try:
        client.wait_for_workers(1, timeout=cfg.startup_timeout)
    except Exception:  # distributed raises TimeoutError (builtin or asyncio, by version)
        hint = {"slurm": f"; see squeue and the worker logs in {cfg.log_directory or 'the job directory'}",
                "kubernetes": "; see kubectl get pods and the worker pods' logs"}.get(cfg.kind, "")
        raise CryodaskError(f"--cluster {cfg.kind}: no Dask worker joined within {cfg.startup_timeout:g} s"
                            f"{hint}") from None


@contextlib.contextmanager
def client_for(cfg: ClusterConfig | None = None, *, announce=print) -> Iterator[Any]:
    """Context manager: start the configured cluster (or connect to ``scheduler_address``), yield
    a connected ``distributed.Client``, announce the dashboard link, and shut everything down
    on exit, also after an exception or Ctrl-C (SLURM jobs are cancelled, pods deleted)."""
    from distributed import Client

    cfg = cfg or ClusterConfig()
    if cfg.scheduler_address:
        cluster = None
        try:
            client = Client(cfg.scheduler_address, timeout=cfg.startup_timeout or 30)
        except OSError as e:
            raise CryodaskError(f"cannot reach the Dask scheduler at {cfg.scheduler_address} ({e})") from None
    else:
        cluster = make_cluster(cfg)
        try:
            client = Client(cluster)
        except BaseException:
            cluster.close()
            raise
    try:
        client.register_plugin(_ThreadLimiter(), name="cryodask-threads")
        announce(f"Dask dashboard: {client.dashboard_link}")
        if cfg.kind in ("slurm", "kubernetes") and cluster is not None:
            what = "job" if cfg.kind == "slurm" else "pod"
            n = (f"{cfg.n_workers} worker{'s' * (cfg.n_workers != 1)}" if cfg.n_workers else
                 f"adaptive {cfg.adapt_min or 0}-{cfg.adapt_max} {what}s" if cfg.adapt_max else
                 f"{cfg.jobs} {what}{'s' * (cfg.jobs != 1)}")
            announce(f"{cfg.kind}: requested {n}; work starts as they join")
        if cfg.startup_timeout:
            _wait_for_first_worker(client, cfg)
        yield client
    finally:
        try:
            client.close()
        finally:
            if cluster is not None:
                cluster.close()
