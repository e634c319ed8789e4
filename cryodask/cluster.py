"""Dask clusters from configuration, through the ecosystem's own deployers.

``local`` (default): :class:`distributed.LocalCluster` on this machine. ``cuda``:
:class:`dask_cuda.LocalCUDACluster`, one worker per GPU. ``slurm``:
:class:`dask_jobqueue.SLURMCluster`. ``kubernetes``: :class:`dask_kubernetes.operator.KubeCluster`.
No home-made scheduler: cryodask only chooses the deployer and its resources.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any, Iterator

from .errors import CryodaskError

log = logging.getLogger("cryodask")

__all__ = ["ClusterConfig", "make_cluster", "client_for", "limit_threads"]


@dataclass
class ClusterConfig:
    """Cluster settings (the ``cluster:`` section of a run configuration).

    kind: local | cuda | slurm | kubernetes. ``n_workers``/``threads_per_worker`` default to one
    single-threaded worker process per CPU core (local) or per GPU (cuda). ``processes=False``
    runs workers as threads in this process (fast start-up, for small jobs and tests).
    SLURM/Kubernetes resources: ``cores``, ``memory``, ``walltime``, ``queue``, ``gpus``,
    ``job_extra_directives``, ``jobs`` (fixed) or ``adapt_min``/``adapt_max`` (adaptive).
    """

    kind: str = "local"
    n_workers: int | None = None
    threads_per_worker: int = 1
    processes: bool = True
    memory_limit: str | None = "auto"
    dashboard_address: str = ":8787"
    local_directory: str | None = None
    # batch systems
    cores: int = 1
    memory: str = "4GB"
    walltime: str = "01:00:00"
    queue: str | None = None
    account: str | None = None
    gpus: int = 0
    job_extra_directives: list[str] = field(default_factory=list)
    interface: str | None = None
    jobs: int = 2
    adapt_min: int | None = None
    adapt_max: int | None = None
    log_directory: str | None = None
    # kubernetes
    image: str = "ghcr.io/cryodask/cryodask:latest"
    namespace: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ClusterConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CryodaskError(f"unknown cluster setting(s): {', '.join(unknown)}")
        return cls(**d)


def limit_threads() -> None:
    """Worker set-up: one thread each for torch and OpenCV (they would oversubscribe cores)."""
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
        from dask_cuda import LocalCUDACluster
    except Exception as e:  # ImportError, or CUDA bindings missing
        raise CryodaskError(
            "--cluster cuda needs the GPU extra: pip install 'cryodask[gpu]' "
            f"(import dask_cuda failed: {e})") from None
    try:
        import torch

        if not torch.cuda.is_available():
            raise CryodaskError("--cluster cuda: no CUDA GPU is visible on this machine "
                                "(torch.cuda.is_available() is False); use --cluster local")
        return LocalCUDACluster(dashboard_address=cfg.dashboard_address, local_directory=cfg.local_directory,
                                threads_per_worker=cfg.threads_per_worker)
    except CryodaskError:
        raise
    except Exception as e:  # e.g. pynvml.NVMLError_LibraryNotFound without a driver
        raise CryodaskError(f"--cluster cuda: no usable GPU ({type(e).__name__}: {e})") from None


def _slurm(cfg: ClusterConfig):
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise CryodaskError("--cluster slurm needs dask-jobqueue: pip install 'cryodask[cluster]'") from None
    import sys

    extra = list(cfg.job_extra_directives)
    if cfg.gpus:
        extra.append(f"--gres=gpu:{cfg.gpus}")
    kw: dict[str, Any] = dict(
        cores=cfg.cores, processes=1, memory=cfg.memory, walltime=cfg.walltime,
        job_extra_directives=extra, python=sys.executable,
        scheduler_options={"dashboard_address": cfg.dashboard_address},
        worker_extra_args=["--preload", "cryodask.cluster"],
    )
    for key in ("queue", "account", "interface", "log_directory", "local_directory"):
        if getattr(cfg, key):
            kw[key] = getattr(cfg, key)
    cluster = SLURMCluster(**kw)
    if cfg.adapt_max:
        cluster.adapt(minimum_jobs=cfg.adapt_min or 0, maximum_jobs=cfg.adapt_max)
    else:
        cluster.scale(jobs=cfg.jobs)
    return cluster


def _kubernetes(cfg: ClusterConfig):
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError:
        raise CryodaskError("--cluster kubernetes needs dask-kubernetes: pip install 'cryodask[k8s]'") from None
    cluster = KubeCluster(name="cryodask", image=cfg.image, namespace=cfg.namespace,
                          n_workers=cfg.n_workers or cfg.jobs,
                          resources={"limits": {"cpu": str(cfg.cores), "memory": cfg.memory}})
    if cfg.adapt_max:
        cluster.adapt(minimum=cfg.adapt_min or 0, maximum=cfg.adapt_max)
    return cluster


_DEPLOYERS = {"local": _local, "cuda": _cuda, "slurm": _slurm, "kubernetes": _kubernetes}


def make_cluster(cfg: ClusterConfig):
    """Build the cluster object for ``cfg.kind`` (not yet connected to a client)."""
    try:
        deploy = _DEPLOYERS[cfg.kind]
    except KeyError:
        raise CryodaskError(f"unknown cluster kind {cfg.kind!r}: use local, cuda, slurm or kubernetes") from None
    return deploy(cfg)


@contextlib.contextmanager
def client_for(cfg: ClusterConfig | None = None, *, announce=print) -> Iterator[Any]:
    """Context manager: start the configured cluster, yield a connected ``distributed.Client``,
    print the dashboard address, and shut everything down cleanly on exit."""
    from distributed import Client

    cfg = cfg or ClusterConfig()
    cluster = make_cluster(cfg)
    client = Client(cluster)
    try:
        client.run(limit_threads)
        if cfg.processes or cfg.kind != "local":
            client.register_plugin(_ThreadLimiter(), name="cryodask-threads")
        announce(f"Dask dashboard: {client.dashboard_link}")
        yield client
    finally:
        client.close()
        cluster.close()


def _thread_limiter_cls():
    from distributed.diagnostics.plugin import WorkerPlugin

    class ThreadLimiter(WorkerPlugin):
        """Apply :func:`limit_threads` on every worker, including ones that join later."""

        def setup(self, worker):
            limit_threads()

    return ThreadLimiter


def _ThreadLimiter():  # noqa: N802 - factory so distributed is imported lazily
    return _thread_limiter_cls()()


# ``dask worker --preload cryodask.cluster`` runs this on batch-system workers
def dask_setup(worker=None):  # pragma: no cover - exercised on SLURM workers
    limit_threads()
