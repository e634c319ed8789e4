"""Running graphs: progress display, run log, stage timing."""
from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("cryodask")

__all__ = ["compute", "setup_logging", "stage_timer", "dataset_scope", "scope_state", "inherit_scope",
           "release_freed_memory", "glibc", "peak_rss_mib"]

# per-thread state: a collection runs each dataset's pipeline in a thread of its own, and a
# pipeline runs independent stages in threads of their own (name: the dataset; owner: the thread
# whose run log receives the records; priority: the Dask priority of this thread's computes)
_scope = threading.local()
_owners: dict[int, int] = {}  # helper thread ident -> the thread ident that owns its log records
_progress_lock = threading.Lock()  # one progress bar at a time in the terminal
_FMT = "%(asctime)s %(levelname)s %(cd_prefix)s%(message)s"


class _PrefixFilter(logging.Filter):
    """Adds ``cd_prefix`` ("[dataset] " inside a :func:`dataset_scope`, else "") to records."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = getattr(_scope, "name", None)
        record.cd_prefix = f"[{name}] " if name else ""
        return True


class _ThreadFilter(logging.Filter):
    """Passes only records emitted by one thread (a dataset's run log inside a collection)."""

    def __init__(self, ident: int):
        super().__init__()
        self.ident = ident

    def filter(self, record: logging.LogRecord) -> bool:
        return _owners.get(record.thread, record.thread) == self.ident


def _in_scope() -> bool:
    return getattr(_scope, "name", None) is not None


@contextlib.contextmanager
def dataset_scope(name: str) -> Iterator[None]:
    """Run one dataset of a collection in this thread: log lines get a ``[name]`` prefix,
    :func:`setup_logging` only attaches a run log that receives this thread's records (the
    others' logging is left alone), and progress bars are off (several would interleave)."""
    _scope.name = str(name)
    try:
        yield
    finally:
        _detach_thread_file()
        _scope.name = None


def scope_state() -> dict[str, Any]:
    """This thread's scope (dataset name, log owner, compute priority), to hand to a helper
    thread through :func:`inherit_scope`."""
    return {"name": getattr(_scope, "name", None), "priority": getattr(_scope, "priority", 0),
            "owner": _owners.get(threading.get_ident(), threading.get_ident())}


@contextlib.contextmanager
def inherit_scope(state: dict[str, Any], priority: int | None = None) -> Iterator[None]:
    """Run a helper thread (e.g. a pipeline stage that overlaps another) as part of the thread
    that made ``state`` (:func:`scope_state`): its log records carry the same dataset prefix and
    go to the same run log. ``priority``: Dask priority of this thread's computes (higher runs
    first when both compete for workers; default that of ``state``)."""
    me = threading.get_ident()
    _scope.name = state.get("name")
    _scope.priority = state.get("priority", 0) if priority is None else priority
    _owners[me] = state["owner"]
    try:
        yield
    finally:
        _owners.pop(me, None)
        _scope.name = None
        _scope.priority = 0


def _detach_thread_file() -> None:
    root = logging.getLogger("cryodask")
    ident = threading.get_ident()
    for h in list(root.handlers):
        if getattr(h, "cd_thread", None) == ident:
            root.removeHandler(h)
            h.close()


def _active_client():
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def compute(*objs: Any, label: str = "", progress: bool | None = None) -> tuple:
    """``dask.compute`` on the active scheduler with a progress bar when attached to a terminal.

    With a distributed client the bar is ``distributed.progress`` (the dashboard shows the
    task stream); otherwise ``dask.diagnostics.ProgressBar``.
    """
    import dask

    show = (sys.stderr.isatty() and not _in_scope()) if progress is None else progress
    # computes running at the same time (overlapping stages): only one draws a bar
    bar = show and _progress_lock.acquire(blocking=False)
    try:
        if label:
            log.info("computing: %s", label)
        client = _active_client()
        if client is not None:
            futures = client.compute(list(objs), priority=getattr(_scope, "priority", 0))
            if bar:
                from distributed import progress as dprogress

                dprogress(futures)
                print(file=sys.stderr)
            return tuple(client.gather(futures))
        if bar:
            from dask.diagnostics import ProgressBar

            with ProgressBar(out=sys.stderr):
                return dask.compute(*objs)
        return dask.compute(*objs)
    finally:
        if bar:
            _progress_lock.release()


def setup_logging(log_file: str | Path | None = None, debug: bool = False) -> None:
    """Log to stderr (INFO) and, if given, to ``log_file`` (DEBUG).

    Inside a :func:`dataset_scope` only this thread's run log is (re)attached; the stderr
    handler and the other datasets' logs stay as they are."""
    root = logging.getLogger("cryodask")
    root.setLevel(logging.DEBUG)
    fmt = logging.Formatter(_FMT, "%H:%M:%S")
    if _in_scope():
        _detach_thread_file()
        if log_file:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(log_file)
            fh.setLevel(logging.DEBUG)
            fh.setFormatter(fmt)
            fh.addFilter(_PrefixFilter())
            fh.addFilter(_ThreadFilter(threading.get_ident()))
            fh.cd_thread = threading.get_ident()
            root.addHandler(fh)
        return
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    sh = logging.StreamHandler(sys.stderr)
    sh.setLevel(logging.DEBUG if debug else logging.INFO)
    sh.setFormatter(fmt)
    sh.addFilter(_PrefixFilter())
    root.addHandler(sh)
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(fmt)
        fh.addFilter(_PrefixFilter())
        root.addHandler(fh)
    root.propagate = False


@contextlib.contextmanager
def stage_timer(record: dict, name: str) -> Iterator[dict]:
    """Time a stage; stores ``{'seconds': …}`` (plus whatever the block adds) in ``record[name]``."""
    entry: dict[str, Any] = {}
    t0 = time.perf_counter()
    log.info("stage %s: start", name)
    try:
        yield entry
    finally:
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        record[name] = entry
        log.info("stage %s: done in %.1f s", name, entry["seconds"])


def peak_rss_mib() -> float:
    """Peak resident memory of this process, MiB (Linux ``VmHWM``).

    Not ``getrusage().ru_maxrss``: Linux keeps that across ``execve``, so a worker process spawned
    (fork + exec) by a large parent reports the parent's peak until it grows past it. Falls back
    to ``ru_maxrss`` where ``/proc`` is missing.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def run_beside(fn, *args, priority: int = 1):
    """Start ``fn(*args)`` on the Dask cluster when called from inside a task on a distributed
    worker, so that a free worker runs it while the caller goes on with its own share; returns a
    function of no arguments that waits for the result. Anywhere else (no worker: the sync or
    threaded scheduler, a plain call) nothing starts and the returned function runs
    ``fn(*args)`` when called, so results are the same either way.

    For the independent pieces of a task that holds up the whole cluster, such as a dataset-wide
    reduction that every micrograph waits for. While it waits, the calling task leaves its
    worker's thread pool (``distributed.secede``), so a one-worker cluster runs ``fn`` in the
    slot it frees; it rejoins before returning. The piece runs at Dask priority ``priority``
    (above the default 0: it is on the critical path). A result never asked for is dropped with
    the returned function."""
    try:
        from distributed import get_client, get_worker

        get_worker()
    except (ImportError, ValueError):
        return functools.partial(fn, *args)
    future = get_client().submit(fn, *args, pure=False, priority=priority)

    def result():
        if future.done():
            return future.result()
        from distributed import rejoin, secede

        secede()
        try:
            return future.result()
        finally:
            rejoin()

    return result


def release_freed_memory() -> None:
    """Hand the heap memory that this process has freed back to the operating system (glibc's
    ``malloc_trim``; nothing elsewhere). Workers keep arrays below 32 MB in the heap
    (:func:`cryodask.cluster.tune_malloc`), and glibc keeps freed heap pages: picking one
    micrograph allocates and frees tens of MB of temporaries while the small results of the
    micrographs before it wait for the dataset-wide steps, and the stores' chunk writes free a
    chunk at a time. Without this a worker's resident memory grows with the number of
    micrographs it has processed."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def glibc():
    """This process's glibc (ctypes), or None where the C library is not glibc (macOS, musl)."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
